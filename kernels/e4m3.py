"""e4m3 (float8_e4m3fn) values converted exactly to a 16-bit compute dtype inside a Triton kernel,
shared by the attention kernels that read an fp8 KV cache (decode, prefill).

On the GPU a kernel reads the cache as bytes (uint8) and converts them with inline PTX, four
values per instruction group; elsewhere (the interpreter) it reads float8e4nv and casts.
"""

import triton
import triton.language as tl

# e4m3 bytes -> bfloat16, four per 32-bit register. Byte b becomes (b & 0x80) << 8 |
# (b & 0x7F) << 4: e4m3's sign, exponent and mantissa read with bfloat16's exponent bias, i.e. the
# value times 2**-120, exact for every code (e4m3's exponents 1..15 are bfloat16 normals and its
# subnormals bfloat16 subnormals); a multiply by 2**120 (0x7B80, exact) restores the value.
_E4M3_TO_BF16 = tl.constexpr("""{
    .reg .b32 lo, hi, t, big, neg0;
    prmt.b32 lo, $2, 0, 0x1404;
    prmt.b32 hi, $2, 0, 0x3424;
    shr.b32 t, lo, 4;
    and.b32 t, t, 0x07F007F0;
    lop3.b32 lo, lo, t, 0x80008000, 0xEC;
    shr.b32 t, hi, 4;
    and.b32 t, t, 0x07F007F0;
    lop3.b32 hi, hi, t, 0x80008000, 0xEC;
    mov.b32 big, 0x7B807B80;
    mov.b32 neg0, 0x80008000;
    fma.rn.bf16x2 $0, lo, big, neg0;
    fma.rn.bf16x2 $1, hi, big, neg0;
}""")
# e4m3 bytes -> float16 with the hardware's exact pairwise conversion (sm89+).
_E4M3_TO_F16 = tl.constexpr("""{
    .reg .b16 a, b;
    mov.b32 {a, b}, $2;
    cvt.rn.f16x2.e4m3x2 $0, a;
    cvt.rn.f16x2.e4m3x2 $1, b;
}""")


@triton.jit
def from_e4m3(x, dtype: tl.constexpr, ASM: tl.constexpr):
    """e4m3 values (uint8 bits under ASM, else float8e4nv) in `dtype`, exactly."""
    if ASM:
        # Not pure: a pure op lets the compiler move the conversion after the shared-memory load
        # into the MMA operand layout, which reads fp8 bytes one at a time (in the sm90 PTX of
        # Triton 3.6, 875 instructions per tile of the loop against 596).
        if dtype == tl.float16:
            return tl.inline_asm_elementwise(_E4M3_TO_F16, "=r,=r,r", [x], dtype=tl.float16,
                                             is_pure=False, pack=4)
        else:
            return tl.inline_asm_elementwise(_E4M3_TO_BF16, "=r,=r,r", [x], dtype=tl.bfloat16,
                                             is_pure=False, pack=4)
    else:
        return x.to(dtype)
