"""OffloadedKVStore: a KV cache whose layers live on the GPU or in pinned host memory.

Implements facli.offload.store.KVStore. Each layer keeps positions [0, split) on the GPU and
[split, capacity) on the host: split = capacity for GPU layers, `gpu_prefix_tokens` (default
0) for host layers. Byte counts below are Llama-7B (32 layers, 32 KV heads, D = 128, bf16):
16 KiB of K+V per token and layer, 4 GiB per layer at 256K; fp8 (e4m3 plus a float32 scale per
token and head) stores 8.25 KiB per token and layer.

Prefill over a host layer (chunk of T tokens at [start, stop)):
  The chunk must attend to the layer's whole prefix, so the prefix is brought into a GPU
  staging slot (one layer, model dtype): the slot is prefetched on a side stream while earlier
  layers compute, the chunk's K/V are written into the slot, attention runs there with the
  prefill kernel, and the chunk's K/V go back to host memory by an asynchronous device-to-host
  copy on a second side stream (the other copy engine). Two slots (the double buffer) bound
  the GPU's share of host layers to 2 layers: 8 GiB at 256K, plus an 8192-row fp8 ring for
  dequantizing on the GPU when kv_dtype="fp8". PCIe cost per host layer for a prompt of S
  tokens in chunks of C: about S^2 / (2C) tokens host-to-device (256K in 8K chunks: 64 GiB, 1.2 s
  at 55 GB/s) against 2 * S^2 * D * Hq attention FLOPs (5.6e14, 1.4 s at 400 TFLOP/s), so at long
  contexts the reload is about as long as that layer's attention and hides behind the compute
  of the layers before it. Streaming the prefix through smaller tiles with an LSE merge would
  move the same bytes (each prefix key must reach the GPU once per chunk) and save only
  staging memory; the CPU cannot take a chunk's attention (1.8e13 FLOPs per chunk and layer).
  The reloads vanish if the engine runs prefill layer-major (every chunk of a layer before the
  next layer, holding the prompt's hidden states: 2 GiB at 256K): the slot keeps its layer, so
  each host layer crosses PCIe once, as write-back. The store accepts either order.

Decode over a host layer, decode_mode="prefetch":
  While layer i computes, the next host layer's [0, len) is copied into the other slot on the
  prefetch stream (the first host layer of the next token is prefetched after the last one of
  this token). Attention reads the slot; the new token's K/V (16 KiB) go back on the write-back
  stream. Each host layer costs len * 16 KiB over PCIe per token (4 GiB, 78 ms at 256K) and the
  copies overlap the compute of the layers in between, so decode is PCIe-bound: about
  55 GB/s / (host layers * 4 GiB) tokens/s at 256K, twice that with fp8. A slot keeps its
  layer across tokens, so with one or two host layers only the new token moves.

Decode over a host layer, decode_mode="cpu" or "split": the CPU attends to host rows in host
memory, alone or beside a PCIe stream (offload.cooperative_decode).

Packed slots (pack_slots=True, the default), before any of the above: while no host layer holds
more than packed_slot_rows positions (256K with 4 host layers: 128K), the two staging slots
keep every host layer's rows at once, each in its own share of a slot's rows. Prefill chunks
and decode tokens are written there and back to host memory, and attention reads them there:
nothing is loaded over PCIe, whatever the decode mode, so a prompt much shorter than the
capacity decodes at about the speed of an all-GPU cache. The first host layer to outgrow its
share unpacks the store until the next reset; its rows are all in host memory by then.

gpu_prefix_tokens > 0 keeps a host layer's first positions on the GPU: they are copied
device-to-device into a slot (never over PCIe) when staging, and are the GPU's concurrent share
in "cpu" mode. A decode step reads fp8 GPU rows as e4m3 with their scales, in the decode kernel,
on GPUs that convert e4m3 (READS_FP8_FROM). Prefill over them goes to the Hopper Gluon kernel,
which dequantizes each tile in shared memory, where the run rules let it
(policy.HOPPER_PREFILL_READS_FP8). Elsewhere (and decode on older GPUs, the CPU) they are
dequantized FP8_TILE rows at a time and the tiles merged by LSE, so no bf16 copy of a whole
layer is made: on an H100 the bf16 Triton kernel over dequantized tiles runs about 1.7x as fast
as the Triton kernel reading e4m3 (`benchmarks/attention.py --fp8`). Host fp8 rows cross PCIe as
fp8 and are dequantized on the GPU into the slot (through a ring of 8192 rows).
"""

import copy

import torch

from facli.errors import FacliError
from facli.kernels import (
    common,
    decode_attention,
    elementwise,
    merge_attention,
    prefill_attention,
    prefill_reads_fp8_at_speed,
)
from facli.offload.cooperative_decode import CooperativeDecode
from facli.offload.cpu_attention import TileWorkspace
from facli.offload.fp8 import dequantize_into, store_rows_fp8
from facli.offload.kv_parts import Chunk, KVPart, Slot
from facli.offload.packed_slots import PackedSlots
from facli.offload.streams import CopyQueues, host_empty
from facli.planner.policy import (
    FP8_PREFILL_TILE_ROWS,
    FP8_RING_ROWS,
    STAGING_SLOTS,
    packed_slot_rows,
)

DECODE_MODES = ("prefetch", "cpu", "split")
KV_DTYPES = (None, "fp8")
RAW_ROWS = FP8_RING_ROWS
FP8_TILE = FP8_PREFILL_TILE_ROWS


class OffloadedKVStore(CooperativeDecode, PackedSlots):
    """KV cache with GPU layers and host layers; see the module docstring for the data flow.

    host_layers: layers whose positions from `gpu_prefix_tokens` on live in host memory.
    decode_mode: "prefetch" (stream host KV to the GPU), "cpu" (attend on the host CPU) or
        "split" (each host layer's rows, part streamed and part attended on the CPU); an
        attribute that may be changed between steps, as may cpu_share.
    cpu_share: in "split" mode, the share of each host layer's host rows the CPU attends.
    pack_slots: keep every host layer's rows in the staging slots while they fit (the module
        docstring); an attribute that takes effect at the next reset.
    kv_dtype: None (store in `dtype`) or "fp8" (e4m3 with per-token-per-head scales).
    """

    def __init__(self, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, host_layers: frozenset = frozenset(),
                 decode_mode: str = "prefetch", kv_dtype: str | None = None,
                 gpu_prefix_tokens: int = 0, cpu_share: float = 0.5, pack_slots: bool = True):
        _validate(num_layers, host_layers, decode_mode, kv_dtype, gpu_prefix_tokens, cpu_share)
        self.batch, self.capacity, self.dtype = batch, capacity, dtype
        self.device = torch.device(device)
        self.decode_mode, self.fp8 = decode_mode, kv_dtype == "fp8"
        self.cpu_share = cpu_share
        self.host_layers = frozenset(host_layers)
        self.queues = CopyQueues(self.device)
        self._pin = self.queues.cuda
        self._split = [min(gpu_prefix_tokens, capacity) if layer in self.host_layers else capacity
                       for layer in range(num_layers)]
        shape = (batch, kv_heads, head_dim, dtype, self.fp8)
        # GPUs before READS_FP8_FROM dequantize fp8 rows in tiles chosen on the host.
        old_gpu = self.fp8 and self.device.type == "cuda" and not _reads_fp8(self.device)
        self.graph_layers = frozenset() if old_gpu else frozenset(
            layer for layer in range(num_layers) if layer not in self.host_layers)
        # Graph layers start as zeros: a decode step at a tensor position reads every row up to
        # the capacity (masked by length), and the PyTorch reference would turn unwritten NaN
        # bytes into NaN outputs (0 * NaN).
        self._dev = [KVPart(batch, split, *shape[1:], self._device_zeros
                            if layer in self.graph_layers else self._device_empty,
                            head_major_scales=True)
                     for layer, split in enumerate(self._split)]
        self._host = [KVPart(batch, capacity - split, *shape[1:], self._host_empty)
                      if split < capacity else None for split in self._split]
        self._staged = [layer for layer in range(num_layers) if self._host[layer] is not None]
        slots = min(STAGING_SLOTS, len(self._staged))
        self._slots = [Slot(*[self._device_empty((batch, capacity, kv_heads, head_dim), dtype)
                              for _ in range(2)]) for _ in range(slots)]
        self._raw = (KVPart(batch, min(RAW_ROWS, capacity), *shape[1:], self._device_empty)
                     if self.fp8 and self._staged else None)
        self.pack_slots = pack_slots  # takes effect at the next reset
        self._packed = pack_slots and bool(self._slots)
        self._region_rows = packed_slot_rows(capacity, len(self._staged))
        self._per_slot = -(-len(self._staged) // max(len(self._slots), 1))
        self._lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self._prefix_lens = torch.zeros_like(self._lens)
        self._graph_lens = torch.zeros_like(self._lens)
        self._cpu_tiles = TileWorkspace()  # float32 K/V tiles of "cpu" mode, reused every step
        self._written = [0] * num_layers
        self._layer_event = [None] * num_layers
        self._clock = 0
        self.h2d_bytes = 0  # host-to-device KV bytes moved so far (staging loads)
        self.d2h_bytes = 0  # device-to-host KV bytes moved so far (write-backs, new tokens)

    def _device_empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _device_zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=self.device)

    def _host_empty(self, shape, dtype):
        return host_empty(shape, dtype, pin=self._pin)

    def row(self, index: int) -> "OffloadedKVStore":
        """Sequence `index` as a store of batch 1 sharing this one's memory (DeviceKVCache.row);
        only without host layers, as rows decode together only from a cache on the GPUs."""
        if self._staged:
            raise FacliError("expected a KV store without host layers for a row view, got host "
                             f"layers {sorted(self.host_layers)}")
        view = copy.copy(self)
        view.batch = 1
        view._dev = [part.row(index) for part in self._dev]
        view._lens, view._prefix_lens, view._graph_lens = (
            lens[index:index + 1] for lens in (self._lens, self._prefix_lens, self._graph_lens))
        view._written = [0] * len(self._written)
        view._layer_event = [None] * len(self._layer_event)
        return view

    def gpu_bytes(self) -> int:
        """Bytes this store holds on the GPU: GPU rows, staging slots, fp8 ring."""
        parts = self._dev + ([self._raw] if self._raw is not None else [])
        slots = sum(2 * s.keys.numel() * s.keys.element_size() for s in self._slots)
        return sum(p.nbytes() for p in parts) + slots

    def host_bytes(self) -> int:
        """Bytes this store holds in host memory (pinned when CUDA is available)."""
        return sum(p.nbytes() for p in self._host if p is not None)

    def reset(self) -> None:
        self._lens.zero_()
        self._written = [0] * len(self._written)
        for slot in self._slots:
            slot.layer, slot.length = None, 0
        self._packed = self.pack_slots and bool(self._slots)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store k, v [B, T, Hkv, D] at start..start+T of `layer` without attending (restoring
        a saved prefix; benchmarks filling a long cache). Host rows are copied asynchronously."""
        stop = start + k.shape[1]
        self._check(layer, start, stop)
        chunk = Chunk.encode(k, v, self.dtype, self.fp8)
        region = self._region(layer, stop)
        if region is not None:
            self._into_rows(*region, chunk, start, stop)
        self._write_back(layer, chunk, start, stop)

    def _check(self, layer, start, stop):
        if stop > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, asked for {stop}")
        if start > self._written[layer]:
            raise ValueError(f"layer {layer} holds {self._written[layer]} positions, "
                             f"asked to write at {start}")

    def attend(self, layer, q, k, v, start, rotary=None):
        """Store k, v [B, T, Hkv, D] at start..start+T of `layer`; causal attention
        [B, T, Hq, D] of q [B, T, Hq, D] over positions 0..start+T.

        `start` may be an int64 device tensor [B] for a decode step (T = 1) of a layer in
        `graph_layers` (a GPU layer, whose fp8 rows, if any, the decode kernel reads directly),
        one position per sequence: no host value is read, so the step can be captured in a CUDA
        graph, and the sequences may each be at their own length. Such steps skip the host's
        bookkeeping of that layer's written positions until the next reset (a prefill)."""
        if isinstance(start, torch.Tensor):
            return self._attend_at(layer, q, k, v, start, rotary)
        stop = start + k.shape[1]
        self._check(layer, start, stop)
        region = self._region(layer, stop)
        if region is None and stop <= self._split[layer]:
            return self._attend_on_device(layer, q, k, v, start, stop)
        chunk = Chunk.encode(k, v, self.dtype, self.fp8)
        if region is not None:
            out = self._attend_packed(layer, q, chunk, start, stop, *region)
        elif q.shape[1] == 1 and self.decode_mode == "cpu":
            out = self._attend_on_cpu(layer, q, chunk, start, stop)
        elif q.shape[1] == 1 and self.decode_mode == "split":
            out = self._attend_split(layer, q, chunk, start, stop)
        else:
            out = self._attend_staged(layer, q, chunk, start, stop)
        return out

    def _attend_at(self, layer, q, k, v, position: torch.Tensor, rotary):
        if layer not in self.graph_layers or q.shape[1] != 1 or rotary is None:
            raise FacliError(f"a tensor position is for single-token decode steps of the graph "
                             f"layers {sorted(self.graph_layers)}, with the rotary angles; "
                             f"layer {layer} takes an int")
        part = self._dev[layer]
        q = elementwise.rotate_and_store_token(q, k, v, *rotary, part.k, part.v, position,
                                               k_scales=part.k_scales, v_scales=part.v_scales)
        if layer == min(self.graph_layers):
            self._graph_lens.copy_(position + 1)
        if not part.k.is_cuda:  # no graph to keep static: read no further than the longest row
            part = part.first(int(position.max()) + 1)
        return decode_attention(q, part.k, part.v, self._graph_lens, k_scales=part.k_scales,
                                v_scales=part.v_scales)

    def _gpu_attention(self, q, keys, values, start, stop):
        if q.shape[1] == 1:
            # Sliced to stop: rows past it were never written (NaN would leak through 0 * NaN).
            self._lens.fill_(stop)
            return decode_attention(q, keys[:, :stop], values[:, :stop], self._lens)
        return prefill_attention(q, keys[:, :stop], values[:, :stop], causal=True, q_offset=start)

    def _attend_on_device(self, layer, q, k, v, start, stop):
        part = self._dev[layer]
        # Quantized straight into the rows in one pass; Triton casts to e4m3 from sm89 on.
        if self.fp8 and _reads_fp8(part.k.device):
            store_rows_fp8(k, v, part.k, part.v, part.k_scales, part.v_scales, start)
        else:
            part.store(start, Chunk.encode(k, v, self.dtype, self.fp8), 0, stop - start)
        self._wrote(layer, start, stop, self.queues.mark() if self._host[layer] else None)
        if self.fp8:
            return self._fp8_attention(q, part, start, stop)
        return self._gpu_attention(q, part.k, part.v, start, stop)

    def _fp8_attention(self, q, part: KVPart, start, stop):
        if q.shape[1] == 1 and _reads_fp8(q.device):
            return self._fp8_decode_attention(q, part, stop, return_lse=False)
        return self._part_attention(q, part, start, own=(start, stop))[0]

    def _fp8_decode_attention(self, q, part: KVPart, stop: int, return_lse):
        """A lone query, at stop - 1, over fp8 rows 0..stop of part: the decode kernel reads the
        e4m3 rows and their scales directly, one pass and no copy."""
        rows = part.first(stop)
        self._prefix_lens.fill_(stop)
        return decode_attention(q, rows.k, rows.v, self._prefix_lens, return_lse=return_lse,
                                k_scales=rows.k_scales, v_scales=rows.v_scales)

    def _part_attention(self, q, part: KVPart, visible: int, own=None):
        """(out, lse) of q over part rows 0..visible, all before the queries, plus the queries'
        own rows own = (start = visible, stop), causal. fp8 rows are read as stored by a lone
        query on a GPU that reads fp8, and by prefill chunks where the prefill kernel reads them
        at its 16-bit speed; everything else goes through `_tiled_attention`."""
        stop = own[1] if own is not None else visible
        if part.fp8 and q.shape[1] == 1 and _reads_fp8(q.device):
            return self._fp8_decode_attention(q, part, stop, return_lse=True)
        if part.fp8 and prefill_reads_fp8_at_speed(q):
            rows = part.first(stop)
            return prefill_attention(q, rows.k, rows.v, causal=own is not None,
                                     q_offset=0 if own is None else own[0], return_lse=True,
                                     k_scales=rows.k_scales, v_scales=rows.v_scales)
        return self._tiled_attention(q, part, visible, own)

    def _tiled_attention(self, q, part: KVPart, visible: int, own=None):
        """_part_attention with fp8 rows dequantized at most FP8_TILE at a time (a 256K layer in
        bf16 would be a 4 GiB temporary; the queries' own rows alone may be more) and the tiles
        merged by log-sum-exp. The last tile ends with the queries' own rows, attended causally,
        and the prefix before it is cut into equal tiles: a prefix and chunk within one tile are
        one kernel call and no merge."""
        stop = visible if own is None else own[1]
        tile = FP8_TILE if part.fp8 else max(stop, 1)
        last_first = min(visible, max(0, stop - tile))
        count = -(-last_first // tile)
        bounds = [last_first * index // count for index in range(count)] + [last_first, stop]
        out = lse = None
        for first, last in zip(bounds, bounds[1:]):
            keys, values = part.read(last, self.dtype, first=first)
            if q.shape[1] == 1:  # a lone query sits after (or at) every key of the tile
                self._prefix_lens.fill_(last - first)
                tile_out = decode_attention(q, keys, values, self._prefix_lens, return_lse=True)
            else:
                own_rows = own is not None and last == stop
                tile_out = prefill_attention(q, keys, values, causal=own_rows,
                                             q_offset=own[0] - first if own_rows else 0,
                                             return_lse=True)
            out, lse = tile_out if out is None else merge_attention(out, lse, *tile_out)
        return out, lse

    def _wrote(self, layer, start, stop, event):
        """Book a write of start..stop: slots holding `layer` stay valid only up to start."""
        self._written[layer] = stop
        self._layer_event[layer] = event
        for slot in self._slots:
            if slot.layer == layer:
                slot.length = min(slot.length, start)

    # -- staged path: prefill, and decode in "prefetch" mode ------------------------------------

    def _into_rows(self, keys, values, chunk, start, stop):
        """keys/values (model dtype) rows start..stop = the chunk as stored: fp8 is dequantized,
        so the chunk attends to its own K/V as every later query will."""
        if self.fp8:
            dequantize_into(keys[:, start:stop], chunk.k, chunk.k_scales)
            dequantize_into(values[:, start:stop], chunk.v, chunk.v_scales)
        else:
            keys[:, start:stop] = chunk.k
            values[:, start:stop] = chunk.v

    def _attend_staged(self, layer, q, chunk, start, stop):
        slot = self._stage(layer, start)
        self._into_rows(slot.keys, slot.values, chunk, start, stop)
        self._write_back(layer, chunk, start, stop)
        slot.length = stop
        out = self._gpu_attention(q, slot.keys, slot.values, start, stop)
        slot.free = [self.queues.mark()]
        self._prefetch_after(layer, slot)
        return out

    def _stage(self, layer, start) -> Slot:
        """The slot holding layer's positions 0..start, loading what is missing; the compute
        stream waits until it is there."""
        held = [s for s in self._slots if s.layer == layer]
        slot = held[0] if held else min(self._slots, key=lambda s: s.last_use)
        self._load(slot, layer, start)
        self.queues.wait([slot.ready])
        self._clock += 1
        slot.last_use = self._clock
        return slot

    def _load(self, slot: Slot, layer: int, upto: int) -> None:
        """Queue the copy of layer's positions up to `upto` into `slot` on the prefetch stream."""
        if slot.layer != layer:  # claimed for `layer` even when nothing needs copying
            slot.layer, slot.length = layer, 0
        begin = slot.length
        if begin >= upto:
            return
        queues, split = self.queues, self._split[layer]
        with queues.on(queues.prefetch):
            queues.wait(slot.free + [self._layer_event[layer]], queues.prefetch)
            if begin < split:
                count = min(upto, split) - begin
                self._dev[layer].load_into(slot.keys, slot.values, begin, begin, count)
            first = max(begin, split)
            if upto > first:
                self._host[layer].load_into(slot.keys, slot.values, first, first - split,
                                            upto - first, raw=self._raw)
                self.h2d_bytes += (upto - first) * self._host[layer].row_bytes()
            slot.ready = queues.mark(queues.prefetch)
        slot.length = upto

    def _write_back(self, layer, chunk, start, stop):
        """Chunk rows go to the layer's GPU rows now and to its host rows on the write-back
        stream (the chunk's tensors are kept alive for it)."""
        split, queues = self._split[layer], self.queues
        if start < split:
            self._dev[layer].store(start, chunk, 0, min(stop, split) - start)
        event = queues.mark()
        if stop > split:
            first = max(start, split)
            with queues.on(queues.writeback):
                queues.wait([event], queues.writeback)
                self._host[layer].store(first - split, chunk, first - start, stop - first)
                self.d2h_bytes += (stop - first) * self._host[layer].row_bytes()
                for tensor in chunk.tensors():
                    queues.keep(tensor, queues.writeback)
                event = queues.mark(queues.writeback)
        self._wrote(layer, start, stop, event)

    def _prefetch_after(self, layer, used: Slot, rows_of=None) -> None:
        """Start loading the next host layer (wrapping to the next step) into the other slot:
        rows_of(next layer) of it, by default every written row."""
        later = [j for j in self._staged if j > layer] or self._staged
        nxt = later[0]
        upto = self._written[nxt] if rows_of is None else rows_of(nxt)
        if any(s.holds(nxt, upto) for s in self._slots):
            return
        free = [s for s in self._slots if s is not used]
        if not free:
            return
        target = next((s for s in free if s.layer == nxt), free[0])
        self._load(target, nxt, upto)


def _reads_fp8(device: torch.device) -> bool:
    """A GPU whose kernels read e4m3 rows as stored (the CPU dequantizes tiles instead)."""
    return device.type == "cuda" and common.reads_e4m3(device)


def _validate(num_layers, host_layers, decode_mode, kv_dtype, gpu_prefix_tokens, cpu_share):
    if decode_mode not in DECODE_MODES:
        raise FacliError(f"expected decode_mode one of {', '.join(DECODE_MODES)}, "
                         f"got {decode_mode!r}")
    if kv_dtype not in KV_DTYPES:
        raise FacliError(f"expected kv_dtype None or 'fp8', got {kv_dtype!r}")
    outside = sorted(set(host_layers) - set(range(num_layers)))
    if outside:
        raise FacliError(f"expected host layers in 0..{num_layers - 1}, got {outside}")
    if gpu_prefix_tokens < 0:
        raise FacliError(f"expected gpu_prefix_tokens >= 0, got {gpu_prefix_tokens}")
    if not 0.0 <= cpu_share <= 1.0:
        raise FacliError(f"expected cpu_share between 0 and 1, got {cpu_share}")

