"""Figures derived from a `facli bench` report (prediction errors, speedups, the decode bandwidth
bound, largest contexts), its table, and the report written as JSON. Pure: no devices."""

import json
from pathlib import Path

from facli.errors import FacliError
from facli.units import format_ctx

GIB = 1024**3


def error_pct(predicted, measured) -> float | None:
    """Signed prediction error in percent of the measurement: +10 means predicted 10% high."""
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured * 100.0


def ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def largest_ok(records: list[dict]) -> int | None:
    """The deepest context that ran to the end."""
    depths = [r["depth"] for r in records if r["status"] == "ok"]
    return max(depths) if depths else None


def prediction_errors(record: dict) -> dict | None:
    """Plan vs measurement for one depth; peak error is the rank with the largest |error|."""
    plan = record.get("plan")
    if plan is None or record["status"] != "ok":
        return None
    measured_peaks = record.get("peak_gpu_bytes") or []
    per_device = [error_pct(p, m) for p, m in zip(plan["peak_gpu_bytes"], measured_peaks)]
    known = [e for e in per_device if e is not None]
    return {
        "peak_gpu_bytes": max(known, key=abs) if known else None,
        "peak_gpu_bytes_per_device": per_device,
        "ttft_s": error_pct(plan["ttft_s"], record["ttft_s"]),
        "prefill_tokens_per_s": error_pct(plan["prefill_tokens_per_s"], record["prefill_tokens_per_s"]),
        "decode_tokens_per_s": error_pct(plan["decode_tokens_per_s"], record["decode_tokens_per_s"]),
        "host_kv_bytes": error_pct(plan["host_kv_bytes"], record["host_kv_bytes"]),
    }


def decode_bound(record: dict, decode_bytes: dict, hbm_gbps: float | None) -> dict | None:
    """Decode tokens/s if every step only read its weights and KV at the GPU's HBM rate.

    KV is counted at the mean cached length over the decode; with KV layers in host memory the
    real limit is lower (the host link), and `host_layers` says so.
    """
    if record["status"] != "ok":
        return None
    plan = record.get("plan") or {}
    rows = record.get("rows", 1)  # a step makes one token per row, and reads each row's KV
    element = 1 if plan.get("kv_dtype") == "fp8" else decode_bytes["kv_element_bytes"]
    cached = rows * (record["prompt_tokens"] + record["new_tokens"] / 2)
    step = decode_bytes["weights_per_rank"] + decode_bytes["kv_elements_per_token_per_rank"] * element * cached
    bound = rows * hbm_gbps * 1e9 / step if hbm_gbps else None
    return {
        "bytes_per_step_per_rank": int(step), "hbm_gbps": hbm_gbps, "bound_tokens_per_s": bound,
        "fraction_of_bound": ratio(record["decode_tokens_per_s"], bound),
        "host_layers": plan.get("host_layers", 0),
    }


def speedups(facli: dict, baseline: dict | None) -> dict | None:
    """facli over transformers at one depth (None where either side did not finish)."""
    if baseline is None:
        return None
    ok = facli["status"] == "ok" and baseline["status"] == "ok"
    pick = (lambda record, key: record.get(key)) if ok else (lambda record, key: None)
    return {
        "depth": facli["depth"],
        "ttft": ratio(pick(baseline, "ttft_s"), pick(facli, "ttft_s")),
        "prefill_tokens_per_s": ratio(pick(facli, "prefill_tokens_per_s"), pick(baseline, "prefill_tokens_per_s")),
        "decode_tokens_per_s": ratio(pick(facli, "decode_tokens_per_s"), pick(baseline, "decode_tokens_per_s")),
    }


def add_derived(report: dict, hbm_gbps: float | None) -> dict:
    """Adds error_pct and bandwidth to each facli depth, and comparison and largest_context."""
    facli, baseline = report["facli"], report["transformers"]
    by_depth = {r["depth"]: r for r in baseline["depths"]} if baseline else {}
    for record in facli["depths"]:
        record["error_pct"] = prediction_errors(record)
        record["bandwidth"] = decode_bound(record, facli["decode_bytes"], hbm_gbps)
    report["comparison"] = [speedups(r, by_depth.get(r["depth"])) for r in facli["depths"]] if baseline else None
    largest_facli = largest_ok(facli["depths"])
    largest_hf = largest_ok(baseline["depths"]) if baseline else None
    report["largest_context"] = {"facli": largest_facli, "transformers": largest_hf,
                                 "ratio": ratio(largest_facli, largest_hf)}
    report["hbm_gbps"] = hbm_gbps
    return report


def _num(value, digits: int = 1, suffix: str = "") -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def _peak(values) -> int | None:
    known = [v for v in values or [] if v is not None]
    return max(known) if known else None


def facli_cells(record: dict) -> list[str]:
    """TTFT, prefill, decode, peak (plan, err), TTFT plan (err), decode plan (err), host KV."""
    if record["status"] != "ok":
        return [record["status"]] + ["-"] * 6
    plan, errors = record.get("plan"), record.get("error_pct") or {}
    peak = _gib(_peak(record["peak_gpu_bytes"]))
    host = _gib(record["host_kv_bytes"])
    if plan is not None:
        peak += f" ({_gib(_peak(plan['peak_gpu_bytes']))}, {_pct(errors.get('peak_gpu_bytes'))})"
        host += f" ({_gib(plan['host_kv_bytes'])})"
    ttft_plan = f"{_num(plan['ttft_s'], 2)} ({_pct(errors.get('ttft_s'))})" if plan else "-"
    decode_plan = f"{_num(plan['decode_tokens_per_s'])} ({_pct(errors.get('decode_tokens_per_s'))})" if plan else "-"
    return [_num(record["ttft_s"], 2), _num(record["prefill_tokens_per_s"], 0),
            _num(record["decode_tokens_per_s"]), peak, ttft_plan, decode_plan, host]


def baseline_cells(record: dict | None) -> list[str]:
    if record is None:
        return ["-"] * 4
    if record["status"] != "ok":
        return [record["status"]] + ["-"] * 3
    return [_num(record["ttft_s"], 2), _num(record["prefill_tokens_per_s"], 0),
            _num(record["decode_tokens_per_s"]), _gib(record["peak_gpu_bytes"])]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(report: dict) -> str:
    by_rows = report["request"].get("batch", 1) != 1
    header = ["depth", *(["rows"] if by_rows else []), "prompt tok", "TTFT s", "prefill tok/s",
              "decode tok/s",
              "peak GiB (plan, err)", "TTFT plan s (err)", "decode plan tok/s (err)",
              "host KV GiB (plan)"]
    baseline = report["transformers"]
    if baseline is not None:
        header += ["HF TTFT s", "HF prefill tok/s", "HF decode tok/s", "HF peak GiB",
                   "prefill x", "decode x"]
    by_depth = {r["depth"]: r for r in baseline["depths"]} if baseline else {}
    rows = []
    for index, record in enumerate(report["facli"]["depths"]):
        rows_cell = [str(record.get("rows", "-"))] if by_rows else []
        row = [format_ctx(record["depth"]), *rows_cell, str(record["prompt_tokens"]),
               *facli_cells(record)]
        if baseline is not None:
            speed = report["comparison"][index] or {}
            row += baseline_cells(by_depth.get(record["depth"]))
            row += [_num(speed.get("prefill_tokens_per_s"), 2, "x"), _num(speed.get("decode_tokens_per_s"), 2, "x")]
        rows.append(row)
    return markdown_table(header, rows)


def bandwidth_table(report: dict) -> str:
    header = ["depth", "GiB read per step per rank", "HBM GB/s", "bound tok/s", "decode tok/s",
              "of bound", "KV layers on host"]
    rows = []
    for record in report["facli"]["depths"]:
        bound = record.get("bandwidth")
        if bound is None:
            rows.append([format_ctx(record["depth"])] + ["-"] * 6)
            continue
        fraction = bound["fraction_of_bound"]
        plan = record.get("plan") or {}
        mode = "rows kept in the staging slots" if plan.get("packed") else (
            f"{plan['decode_mode']} decode" if plan.get("decode_mode") else None)
        host = str(bound["host_layers"]) + (f" ({mode})" if bound["host_layers"] and mode else "")
        rows.append([format_ctx(record["depth"]), _gib(bound["bytes_per_step_per_rank"]),
                     _num(bound["hbm_gbps"], 0), _num(bound["bound_tokens_per_s"]),
                     _num(record["decode_tokens_per_s"]),
                     "-" if fraction is None else f"{fraction * 100:.0f}%", host])
    return markdown_table(header, rows)


def heading(report: dict) -> str:
    env, facli, request = report["environment"], report["facli"], report["request"]
    where = f"{request['devices']} x {env['gpus'][0]}" if env["gpus"] else f"{request['devices']} x CPU ({env['cpu']})"
    commit = env["commit"] + (" (uncommitted changes)" if env.get("dirty") else "")
    kv = request.get("kv_dtype", "auto")
    kv = f", {kv} KV cache" if kv != "auto" else ""
    if request.get("ctx"):
        kv += f" planned for {format_ctx(request['ctx'])} at every depth"
    batch = request.get("batch", 1)
    count = "as many rows as keep the cache on the devices" if batch is None else f"{batch} rows"
    rows = (f"; {count} decoded together (prefilled one after another; TTFT is the last "
            f"row's, tokens/s count every row's)" if batch != 1 else "")
    repeats = request.get("repeats", 1)
    rows += (f"; medians of {repeats} rounds, facli and transformers going first in turn"
             if repeats > 1 else "")
    return (f"{facli['model']} {facli['dtype']}{kv} on {where}; {request['decode_tokens']} decode tokens{rows}; "
            f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, transformers "
            f"{env['transformers']}, Python {env['python']}; facli {commit}; {env['date_utc']}")


def format_report(report: dict) -> str:
    """The text `facli bench` prints: heading, the main table, the decode bound table, the
    largest contexts reached."""
    largest = report["largest_context"]
    parts = [heading(report), "", main_table(report), "", "Decode against the HBM bandwidth bound "
             "(weights + KV at the mean decode length, per rank, per step):", "", bandwidth_table(report), ""]
    line = f"Largest context reached: facli {_ctx(largest['facli'])}"
    if report["transformers"] is not None:
        line += f", transformers {_ctx(largest['transformers'])}"
        if largest["ratio"] is not None:
            line += f" ({largest['ratio']:.1f}x)"
    parts.append(line)
    return "\n".join(parts)


def _ctx(depth) -> str:
    return "none" if depth is None else format_ctx(depth)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401  (whether it imports: an optional dependency)
    except ImportError:
        raise FacliError("expected matplotlib for --plot, it is not installed; "
                         "pip install matplotlib or leave out --plot") from None


def write_json(report: dict, path: Path) -> None:
    """The whole report, indented, to `path` (--json-out)."""
    try:
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as error:
        raise FacliError(f"expected a writable --json-out file, got {path}: "
                         f"{error.strerror}") from None
