"""The `facli bench` baseline: transformers' own model on the same checkpoint (or the same random
shape), device and prompts, timed the way facli is timed.

One `generate` call per depth: a streamer stamps the first new token (time to first token),
the rest gives decode tokens/s. With a batch, the prompt is in every row of one `generate` call
(the same length, so nothing is padded) and tokens/s count every row's tokens. Out of memory at
a depth is a result, not an error.
"""

import time

import torch

from facli.bench.request import (
    OUT_OF_MEMORY,
    WARM_UP_NEW_TOKENS,
    BenchRequest,
    progress,
    prompt_length,
    release_memory,
)
from facli.models.resolve import ResolvedModel

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class FirstTokenClock:
    """A transformers streamer that notes when the first generated token reaches the host."""

    def __init__(self):
        self.started = time.perf_counter()
        self.first_token_at = None
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen and value.numel() > 1:  # generate hands the prompt over first
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_config(config, max_positions: int):
    """A transformers config of a facli ModelConfig's shape (for synthetic weights)."""
    import transformers  # here, not at the top: `facli` starts without loading it

    values = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, max_position_embeddings=max(config.max_position_embeddings, max_positions),
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids) or None,
    )
    if config.model_type == "llama":
        values["attention_bias"] = config.attention_bias
    if config.model_type == "mistral":
        values["sliding_window"] = config.sliding_window
    scaling = config.rope_scaling
    if scaling.rope_type != "default":
        values["rope_scaling"] = {
            "rope_type": scaling.rope_type, "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    return transformers.AutoConfig.for_model(config.model_type, **values)


def build_model(resolved: ResolvedModel, dtype: torch.dtype, device: torch.device, max_positions: int):
    """transformers' model with sdpa attention, made directly on `device` in `dtype`."""
    import transformers  # here, not at the top: `facli` starts without loading it

    if resolved.synthetic:
        with torch.device(device):
            model = transformers.AutoModelForCausalLM.from_config(
                hf_config(resolved.config, max_positions), dtype=dtype, attn_implementation="sdpa")
    else:
        placement = {"device_map": str(device)} if device.type == "cuda" else {}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            resolved.path, dtype=dtype, attn_implementation="sdpa", local_files_only=True, **placement)
    model.eval()
    model.generation_config.eos_token_id = None  # decode every requested token
    return model


@torch.inference_mode()
def timed_generate(model, ids: list[int], new_tokens: int, device: torch.device,
                   batch: int = 1) -> dict:
    """Greedy generate of `new_tokens` after `ids` in `batch` rows: TTFT, prefill and decode
    tokens/s over all rows, peak GPU bytes."""
    inputs = torch.tensor([ids] * batch, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    clock = FirstTokenClock()
    output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=0, streamer=clock)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    finished = time.perf_counter()
    generated = output.shape[1] - inputs.shape[1]
    ttft = clock.first_token_at - clock.started
    decode_s = finished - clock.first_token_at
    return {
        "rows": batch, "new_tokens": generated, "ttft_s": ttft,
        "prefill_tokens_per_s": batch * len(ids) / ttft,
        "decode_tokens_per_s": (batch * (generated - 1) / decode_s
                                if generated > 1 and decode_s > 0 else None),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def measure(model, ids: list[int], depth: int, new_tokens: int, device: torch.device,
            batch: int = 1) -> dict:
    record = {"depth": depth, "prompt_tokens": len(ids), "status": "ok", "error": None}
    out_of_memory = False
    try:
        record.update(timed_generate(model, ids, new_tokens, device, batch))
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
    if out_of_memory:  # outside the handler: its traceback no longer pins the activations
        release_memory(device)
        record.update(status=OUT_OF_MEMORY, error=OUT_OF_MEMORY)
    return record


def run_baseline(request: BenchRequest, resolved: ResolvedModel, prompt: list[int],
                 dtype_name: str, device: torch.device, rows: dict[int, int]) -> dict:
    """Every depth of `request` through transformers on `device`, with prefixes of facli's
    `prompt` ids, in a batch of rows[depth] copies; facli's memory must be free."""
    import transformers  # here, not at the top: `facli` starts without loading it

    dtype = TORCH_DTYPES[dtype_name]
    in_use = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    result = {"version": transformers.__version__, "dtype": dtype_name, "attention": "sdpa",
              "gpu_bytes_in_use_before": in_use, "depths": []}
    progress(f"transformers {transformers.__version__}: building {resolved.name} ({dtype_name}) on {device.type}")
    model, out_of_memory = None, False
    try:
        model = build_model(resolved, dtype, device, request.depths[-1])
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True
    if out_of_memory:
        release_memory(device)
        result["depths"] = [{"depth": d, "status": OUT_OF_MEMORY, "error": "out of memory loading the weights"}
                            for d in request.depths]
        return result
    # kernels and allocator warm
    measure(model, prompt[:32], 0, WARM_UP_NEW_TOKENS[device.type], device, max(rows.values()))
    for depth in request.depths:
        record = measure(model, prompt[:prompt_length(depth, request.decode_tokens)], depth,
                         request.decode_tokens, device, rows[depth])
        result["depths"].append(record)
        progress(describe(record))
        release_memory(device)
    del model
    release_memory(device)
    return result


def describe(record: dict) -> str:
    if record["status"] != "ok":
        return f"depth {record['depth']}: transformers {record['error']}"
    decode = record["decode_tokens_per_s"]  # None: fewer than two decode steps ran
    decode = "not measured" if decode is None else f"{decode:.1f} tok/s"
    return (f"depth {record['depth']}: transformers TTFT {record['ttft_s']:.2f} s, prefill "
            f"{record['prefill_tokens_per_s']:.0f} tok/s, decode {decode}")
