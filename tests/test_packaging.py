"""Installing facli must not change what `import transformers` imports."""

import subprocess
import sys

PROBE = """
import sys
import transformers
from transformers import LlamaForCausalLM, AutoTokenizer
leaked = sorted(name for name in sys.modules if name == "kernels" or name.startswith("facli"))
print(",".join(leaked))
"""


def test_transformers_imports_no_facli_module(tmp_path):
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_kernels_and_offload_live_inside_facli():
    import facli.kernels
    import facli.offload

    assert facli.kernels.__name__ == "facli.kernels"
    assert hasattr(facli.kernels, "prefill_attention")
    assert facli.offload.__name__ == "facli.offload"
