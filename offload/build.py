"""The KV store a plan describes: the all-GPU cache when every layer is resident, else the
offloaded store with the plan's host layers, decode mode and CPU share."""

import torch

from facli.errors import FacliError
from facli.kernels import common
from facli.models.config import ModelConfig
from facli.models.resolve import DTYPES
from facli.offload.device_cache import DeviceKVCache
from facli.offload.kv_store import OffloadedKVStore
from facli.planner.plan import Plan
from facli.planner.policy import holds_rows, uses_offloaded_store


def build_kv_store(run_plan: Plan, config: ModelConfig, world_size: int, device: torch.device):
    """All-GPU cache when every layer is resident, else the offloaded store the plan describes."""
    dtype = DTYPES[run_plan.weight_dtype]
    if run_plan.kv_dtype not in (run_plan.weight_dtype, "fp8"):
        raise FacliError(
            f"expected --kv-dtype equal to the weight dtype ({run_plan.weight_dtype}) or fp8, "
            f"got {run_plan.kv_dtype}"
        )
    shape = (config.num_hidden_layers, run_plan.batch, run_plan.ctx,
             config.num_key_value_heads // world_size, config.head_dim)
    fp8 = run_plan.kv_dtype == "fp8"
    if not uses_offloaded_store(run_plan.decode_mode, fp8):
        return DeviceKVCache(*shape, dtype, device)
    reads_fp8 = common.reads_e4m3(device)
    if run_plan.batch > 1 and not holds_rows(run_plan.decode_mode, fp8, reads_fp8):
        where = ("on a GPU whose decode kernel reads fp8 (compute capability 8.9 or later)"
                 if run_plan.decode_mode == "resident" else "on the GPUs")
        raise FacliError(
            f"expected the KV cache of batch {run_plan.batch} at ctx {run_plan.ctx} to stay wholly "
            f"{where} (decoding rows together needs that), got a plan with decode mode "
            f"{run_plan.decode_mode} and KV dtype {run_plan.kv_dtype}; lower --batch or --ctx"
        )
    mode = run_plan.decode_mode if run_plan.decode_mode != "resident" else "prefetch"
    return OffloadedKVStore(*shape, dtype, device, host_layers=frozenset(run_plan.host.layers),
                            decode_mode=mode, kv_dtype="fp8" if run_plan.kv_dtype == "fp8" else None,
                            cpu_share=run_plan.host_cpu_share)
