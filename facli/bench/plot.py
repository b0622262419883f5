"""A PNG of a `facli bench` report: tokens/s and peak GPU memory against context depth."""

from pathlib import Path

from facli.bench.report import GIB, _peak, heading, require_matplotlib


def _series(records: list[dict], key: str, scale: float = 1.0):
    points = [(r["depth"], r.get(key)) for r in records if r["status"] == "ok" and r.get(key)]
    return [d for d, _ in points], [v / scale for _, v in points]


def _peaks(records: list[dict], plan: bool = False):
    """(depths, GiB): facli's and the plan's per-device lists give their largest entry."""
    points = []
    for record in records:
        source = record.get("plan") if plan else record
        if record["status"] != "ok" or not source:
            continue
        value = source.get("peak_gpu_bytes")
        value = _peak(value) if isinstance(value, list) else value
        if value:
            points.append((record["depth"], value / GIB))
    return [d for d, _ in points], [v for _, v in points]


def write_plot(report: dict, path: Path) -> None:
    """Left: prefill and decode tokens/s (log scale); right: peak GiB, measured and planned."""
    require_matplotlib()
    import matplotlib  # here, not at the top: an optional dependency, for --plot alone

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    facli = report["facli"]["depths"]
    baseline = (report["transformers"] or {}).get("depths") or []
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for records, name, color in ((facli, "facli", "C0"), (baseline, "transformers", "C1")):
        for key, label, style in (("prefill_tokens_per_s", "prefill", "-o"), ("decode_tokens_per_s", "decode", "--s")):
            x, y = _series(records, key)
            if x:
                speed.plot(x, y, style, color=color, label=f"{name} {label}")
        x, y = _peaks(records)
        if x:
            memory.plot(x, y, "-o", color=color, label=f"{name} measured")
    x, y = _peaks(facli, plan=True)
    if x:
        memory.plot(x, y, ":x", color="C0", label="facli plan")
    for axis, title, unit in ((speed, "throughput", "tokens/s"), (memory, "peak GPU memory per device", "GiB")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("context depth (tokens)")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    speed.set_yscale("log")
    figure.suptitle(heading(report), fontsize=7, wrap=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
