"""The markdown table that benchmarks/tensor_parallel.py prints last."""


def table(records: list[dict], world: int, modes: list[str], tiled_modes: list[str]) -> str:
    """Prefill and decode per mode (best of the repeats), speedup over TP=1 and the share of
    communication each tiled mode hides; then the projection-level runs."""
    modes = [m for m in modes if any(r.get("mode") == m and r.get("tp") == world for r in records)]
    tiled = [m for m in modes if m in tiled_modes]
    rows = ["| measurement | TP=1 | " + " | ".join(f"TP={world} {m}" for m in modes)
            + " | speedup (best tiled) | comm hidden: " + " / ".join(tiled) + " |",
            "| --- " * (len(modes) + 4) + "|"]
    by = {}
    for r in records:
        if r["kind"] in ("prefill", "decode"):
            key = (r["kind"], r.get("tokens") or r.get("context"))
            value = r["seconds"] if r["kind"] == "prefill" else r["ms_per_token"]
            by.setdefault(key, {}).setdefault((r["tp"], r["mode"]), []).append(value)
    for (kind, length), values in sorted(by.items()):
        best = {k: min(v) for k, v in values.items()}
        tp1, nocomm, single = best.get((1, "-")), best.get((world, "nocomm")), best.get((world, "single"))
        unit = "s" if kind == "prefill" else "ms/tok"
        cells = [f"{v:.3f} {unit}" if v is not None else "-" for v in [tp1] + [best.get((world, m)) for m in modes]]
        tiled_times = [best[(world, m)] for m in tiled if (world, m) in best]
        speed = f"{tp1 / min(tiled_times):.2f}x" if tp1 and tiled_times else "-"
        hidden = " / ".join(_hidden(nocomm, single, best.get((world, m))) for m in tiled)
        label = f"{length // 1024}K" if length % 1024 == 0 else str(length)
        rows.append(f"| {kind} {label} | " + " | ".join(cells) + f" | {speed} | {hidden} |")
    rows += ["", "| projection | tokens | mode | tile | ms | comm hidden |", "| --- | --- | --- | --- | --- | --- |"]
    proj = [r for r in records if r["kind"] == "projection"]
    for r in proj:
        base = {q["mode"]: q["ms"] for q in proj if q["proj"] == r["proj"] and q["mode"] in ("nocomm", "single")}
        hidden = _hidden(base["nocomm"], base["single"], r["ms"]) if r["mode"] in tiled_modes else ""
        rows.append(f"| {r['proj']} | {r['tokens']} | {r['mode']} | {r['tile'] or '-'} | {r['ms']:.3f} | {hidden} |")
    return "\n".join(rows)


def _hidden(nocomm, single, tiled) -> str:
    if None in (nocomm, single, tiled) or single - nocomm <= 0:
        return "-"
    return f"{100 * (1 - (tiled - nocomm) / (single - nocomm)):.0f}%"
