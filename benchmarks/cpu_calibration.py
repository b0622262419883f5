"""Measure facli's CPU prefill and decode, and refit the CPU time model's constants to them.

    python benchmarks/cpu_calibration.py measure --out FILE.json [--threads 1,2] [--models demo,...]
    python benchmarks/cpu_calibration.py fit FILE.json [FILE.json ...]

`measure` times facli's own forward pass (facli.models.llama.CausalLM over the KV store the planner
builds) as the runtime calls it: one prefill chunk of T tokens after S cached positions, for a
grid of (T, S), with T = 1 being a decode step at depth S. It does so for each model shape and
thread count (torch.set_num_threads). Then it runs whole generations (Runtime.generate: the
planner's chunk, prefill, decode) next to the time model's predictions for them; those runs are
never used in the fit, so they check it. Every call is timed with the machine's other CPU use
alongside (a shared machine's contention is not facli's speed): the fastest quiet call counts.
Where no call was quiet, a one-thread step keeps its CPU seconds ("cpu_time": the core was
shared, but caches were disturbed too, so such figures run high) and others their wall time
("busy"); the fit takes quiet samples only and the table shows the rest beside them.

`fit` fits planner.cpu_time.CpuConstants (least squares on relative error, non-negative) to
the quiet steps of every file given, prints them as facli/planner/cpu_time.py's CPU_CONSTANTS block
(--write puts it there), and prints predicted against measured for every step and run. The
thread scaling comes from records of several thread counts on an idle machine
(tests/data/cpu-calibration-threads-*.json); after a change to the CPU path, measure the
one-thread costs of the code as it is and refit them with that scaling kept:

    python benchmarks/cpu_calibration.py measure --threads 1 --out tests/data/cpu-calibration-costs-<machine>-<commit>.json
    python benchmarks/cpu_calibration.py fit --write --keep-scaling --timings quiet,cpu_time tests/data/cpu-calibration-costs-*.json

docs/calibration.md has the whole procedure and the current fits.
"""

import argparse
import json
import os
import platform
import re
import sys
import textwrap
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from facli.bench.environment import environment
from facli.models.config import ModelConfig
from facli.models.demo import DEMO_CONFIG
from facli.planner import cpu_time
from facli.planner.hardware import CpuSpec, detect_cpu

HERE = Path(__file__).resolve().parent

# The CPU shapes measured: the small random model (`--model random-demo`, "demo" here), and
# SmolLM2-135M's shape, the default model's (GQA 9/3, 30 thin layers, a 49K vocabulary: its LM
# head is a fifth of its weights).
SMOLLM2_135M = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
)
# Two shapes that tell the per-layer overhead from the weights' bytes (the two above hold
# about the same weights per layer): many thin layers, and two wide ones (GQA 4).
NARROW = dict(SMOLLM2_135M, vocab_size=384, hidden_size=128, intermediate_size=352,
              num_hidden_layers=24, num_attention_heads=2, num_key_value_heads=2,
              tie_word_embeddings=False)
WIDE = dict(SMOLLM2_135M, vocab_size=384, hidden_size=2048, intermediate_size=5632,
            num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=8,
            tie_word_embeddings=False)
MODELS = {"demo": dict(DEMO_CONFIG, max_position_embeddings=65536), "smollm2-135m": SMOLLM2_135M,
          "narrow-24l": NARROW, "wide-2l": WIDE}
# (T, S) steps per model: prefill chunks after S cached positions, and decode steps (T = 1);
# chunks up to 8192 tokens, which the planner picks for long prompts.
STEPS = {
    "demo": [(1, s) for s in (0, 1024, 4096, 16384, 32768)]
            + [(t, s) for t in (8, 64, 256, 1024, 2048) for s in (0, 4096)] + [(512, 16384)]
            + [(4096, 0), (8192, 0)],
    "smollm2-135m": [(1, s) for s in (0, 1024, 4096, 16384)]
                    + [(t, s) for t in (8, 64, 256, 1024) for s in (0, 4096)] + [(2048, 0), (4096, 0)],
    "narrow-24l": [(1, 0), (1, 4096), (8, 0), (64, 0), (256, 0)],
    "wide-2l": [(1, 0), (1, 4096), (8, 0), (64, 0), (256, 0), (1024, 0)],
}
# --quick: fewer steps, for thread counts beside the machine's own (what scaling needs).
QUICK_STEPS = {
    "demo": [(1, 0), (1, 4096), (1, 32768), (64, 0), (256, 4096), (1024, 0)],
    "smollm2-135m": [(1, 0), (1, 16384), (64, 0), (256, 4096), (1024, 0)],
    "narrow-24l": [(1, 0), (64, 0)],
    "wide-2l": [(1, 0), (8, 0), (256, 0)],
}
# Whole generations (prompt tokens, new tokens) checked against the time model's predictions.
RUNS = {"demo": [(3000, 24), (9000, 12)], "smollm2-135m": [(1500, 16)], "narrow-24l": [],
        "wide-2l": []}
QUIET_CORES = 0.15  # other processes' average CPU use (cores) during a call that still counts
MIN_WINDOW_S = 0.25  # calls shorter than this run in a loop, so the CPU accounting resolves


def _busy_seconds() -> float:
    """CPU seconds every process of the machine has used (Linux /proc/stat), steal included."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / os.sysconf("SC_CLK_TCK")


def _window(call, repeat: int) -> tuple[float, float, float]:
    """(wall seconds per call, CPU seconds per call of this process, other processes' average
    cores busy meanwhile) over `repeat` calls."""
    busy, own, wall = _busy_seconds(), time.process_time(), time.perf_counter()
    for _ in range(repeat):
        call()
    wall, own = time.perf_counter() - wall, time.process_time() - own
    others = max(0.0, (_busy_seconds() - busy) - own)
    return wall / repeat, own / repeat, others / wall


def _others_busy(seconds: float = 0.5) -> float:
    """Cores other processes keep busy, over `seconds` of this process sleeping."""
    busy = _busy_seconds()
    time.sleep(seconds)
    return (_busy_seconds() - busy) / seconds


def timed(call, reps: int = 3, wait_s: float = 0.0) -> dict:
    """The fastest of `reps` timings of call() after a warm-up, taken while the machine is quiet
    (other processes below QUIET_CORES). With wait_s, waits up to that long for quiet before
    each window, idle meanwhile so as not to disturb what else runs. On one thread, where every
    window was busy, the call's CPU seconds stand for its time ("cpu_time"); otherwise the
    sample is marked busy, and the fit leaves both out."""
    call()
    single, _, _ = _window(call, 1)
    repeat = max(1, min(50, int(MIN_WINDOW_S / max(single, 1e-6))))
    windows, started = [], time.perf_counter()
    while True:
        while wait_s and time.perf_counter() - started < wait_s and _others_busy() > QUIET_CORES:
            time.sleep(2.0)
        windows.append(_window(call, repeat))
        quiet = [w for w in windows if w[2] <= QUIET_CORES]
        if len(quiet) >= reps or (len(windows) >= reps and time.perf_counter() - started >= wait_s):
            break
    base = {"tries": len(windows), "wall_s": min(w[0] for w in windows),
            "cpu_s": min(w[1] for w in windows)}
    if quiet:
        return {**base, "seconds": min(w[0] for w in quiet), "timing": "quiet"}
    if torch.get_num_threads() == 1:
        return {**base, "seconds": base["cpu_s"], "timing": "cpu_time"}
    return {**base, "seconds": base["wall_s"], "timing": "busy"}


def write_checkpoint(directory: Path, config: dict) -> Path:
    """A random float32 checkpoint of `config`'s shape, written by transformers' save_pretrained,
    with facli's byte-level tokenizer."""
    import transformers

    from facli.models.demo import byte_level_tokenizer

    if (directory / "config.json").is_file():
        return directory
    values = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**values))
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.save_pretrained(directory, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(str(directory))
    return directory


def load_runtime(name: str, ctx: int, workdir: Path):
    from facli.models.resolve import resolve_model
    from facli.run_options import RunOptions
    from facli.run.runtime import load_runtime

    path = "random-demo" if name == "demo" else str(write_checkpoint(workdir / name, MODELS[name]))
    return load_runtime(RunOptions(model=path, device="cpu", ctx=ctx), resolve_model(path))


def measure_steps(name: str, threads: int, workdir: Path, steps: list, reps: int, wait_s: float,
                  deadline: float, log, keep) -> None:
    """Each (T, S) step of `name` on `threads` threads: facli's forward pass over the runtime's
    KV store, with S positions cached (random keys and values: their cost does not depend on
    what they hold). keep(sample) as each is measured; none starts after `deadline`."""
    capacity = max(t + s for t, s in steps)
    runtime = load_runtime(name, capacity, workdir)
    kv, model = runtime.kv, runtime.model
    for cache in (getattr(kv, "keys", None), getattr(kv, "values", None)):
        if cache is not None:
            cache.normal_()
    ids = torch.randint(3, runtime.config.vocab_size, (1, max(t for t, _ in steps)))
    for tokens, start in steps:
        if time.perf_counter() > deadline:
            log(f"{name} threads {threads}: out of time, the remaining steps are not measured")
            break

        def call():
            model(ids[:, :tokens], start, kv)

        sample = {"model": name, "threads": threads, "tokens": tokens, "start": start,
                  **timed(call, reps, wait_s)}
        keep(sample)
        log(f"{name} threads {threads} T {tokens} S {start}: {sample['seconds'] * 1e3:.2f} ms "
            f"({sample['timing']})")
    del runtime, kv, model


def measure_runs(name: str, threads: int, workdir: Path, wait_s: float, deadline: float, log,
                 keep) -> None:
    """Whole generations (Runtime.generate, as `facli generate` runs them) with the time model's
    predictions for them (Runtime.predict_prompt); keep(record) as each ends. Each waits up to
    wait_s for the machine to be quiet."""
    from facli.run.sampling import SamplingParams

    for prompt, new in RUNS[name]:
        if time.perf_counter() > deadline:
            break
        runtime = load_runtime(name, prompt + new, workdir)
        ids = torch.randint(3, 259, (prompt,), generator=torch.Generator().manual_seed(prompt)).tolist()
        runtime.generate(ids[:64], max_new_tokens=2, sampling=SamplingParams(), ignore_eos=True)
        waited = time.perf_counter()
        while time.perf_counter() - waited < wait_s and _others_busy() > QUIET_CORES:
            time.sleep(2.0)
        busy, own, wall = _busy_seconds(), time.process_time(), time.perf_counter()
        result = runtime.generate(ids, max_new_tokens=new, sampling=SamplingParams(), ignore_eos=True)
        wall, own = time.perf_counter() - wall, time.process_time() - own
        others = max(0.0, (_busy_seconds() - busy) - own) / wall
        ttft, rate = result.ttft_s, result.decode_tokens_per_s
        timing = "quiet" if others <= QUIET_CORES else "busy"
        if timing == "busy" and threads == 1:
            # The share of the core the run had stretched its prefill and decode alike.
            share = min(1.0, own / wall)
            ttft, rate, timing = ttft * share, rate / share, "cpu_time"
        predicted = runtime.predict_prompt(prompt)
        record = {"model": name, "threads": threads, "prompt_tokens": prompt, "new_tokens": new,
                  "prefill_chunk": runtime.plan.prefill_chunk, "ttft_s": ttft,
                  "decode_tokens_per_s": rate, "predicted_ttft_s": predicted.ttft_s,
                  "predicted_decode_tokens_per_s": predicted.decode_tokens_per_s,
                  "timing": timing, "others_cores": others, "wall_s": wall, "cpu_s": own}
        keep(record)
        log(f"{name} threads {threads} run {prompt}+{new} (chunk {record['prefill_chunk']}): "
            f"ttft {ttft:.2f} s (predicted {_fmt(predicted.ttft_s)}), decode {rate:.1f} tok/s "
            f"(predicted {_fmt(predicted.decode_tokens_per_s)}) ({timing})")
        del runtime


def _fmt(value) -> str:
    return "unknown" if value is None else f"{value:.3g}"


def cpu_environment() -> dict:
    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            model_name = next((line.split(":", 1)[1].strip() for line in info
                               if line.startswith("model name")), model_name)
    except OSError:
        pass
    cpu = detect_cpu()
    return {"cpu_model": model_name, "logical_cpus": os.cpu_count(), "isa": cpu.isa,
            "default_threads": cpu.threads}


def measure(args) -> None:
    def log(line):
        print(line, file=sys.stderr, flush=True)

    env = {**environment(torch.device("cpu"), 1), **cpu_environment()}
    log(" | ".join(f"{k} {v}" for k, v in env.items()))
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    models = args.models.split(",")
    record = {"environment": env, "steps": [], "runs": []}
    deadline = time.perf_counter() + args.budget_s

    def keeper(kind):
        def keep(entry):
            record[kind].append(entry)
            Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        return keep

    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    with tempfile.TemporaryDirectory(prefix="facli-cpu-calibration-") as scratch:
        workdir = Path(args.workdir or scratch)
        for count in threads:
            torch.set_num_threads(count)
            for name in models:
                steps = (QUICK_STEPS if args.quick else STEPS)[name]
                measure_steps(name, count, workdir, steps, args.reps, args.wait_s, deadline, log,
                              keeper("steps"))
                if not args.no_runs:
                    measure_runs(name, count, workdir, args.wait_s, deadline, log, keeper("runs"))
    log(f"wrote {args.out}")


# --- fit ---


def load_records(paths: list[str]) -> tuple[list[dict], list[dict]]:
    steps, runs = [], []
    for path in paths:
        raw = json.loads(Path(path).read_text())
        env = raw["environment"]
        for sample in raw["steps"]:
            steps.append({**sample, **_machine(env)})
        for run in raw["runs"]:
            runs.append({**run, **_machine(env)})
    return steps, runs


def _machine(env: dict) -> dict:
    return {"isa": env["isa"], "cpu_model": env["cpu_model"], "logical_cpus": env["logical_cpus"]}


def config_of(name: str) -> ModelConfig:
    return ModelConfig.from_dict(MODELS[name])


def fit(steps: list[dict], isa: str, timings=("quiet",),
        scaling: cpu_time.CpuScaling | None = None) -> cpu_time.CpuConstants | None:
    """The constants that minimise the squared relative error of the steps timed as `timings`
    (non-negative least squares on the time model's terms), over a grid of the thread scaling's
    shares and exponent, or with `scaling` as given (a refit of one-thread figures alone)."""
    chosen = [s for s in steps if s["isa"] == isa and s["timing"] in timings]
    if not chosen:
        return None
    raw = np.array([cpu_time.cpu_step_terms(config_of(s["model"]), s["tokens"], s["start"], 1,
                                            cpu_time.CpuScaling(0.0, 0.0, 0.0)) for s in chosen])
    threads = np.array([s["threads"] for s in chosen])
    measured = np.array([s["seconds"] for s in chosen])
    best = None
    shares = [float(v) for v in np.round(np.linspace(0.0, 0.5, 26), 3)]
    grid = ([scaling] if scaling else
            [cpu_time.CpuScaling(c, m, o) for c in shares for m in shares
             for o in (0.0, 0.125, 0.25, 0.375, 0.5)])
    for shape in grid:
        rows = raw * cpu_time.thread_factors(threads, shape).T
        coefficients = _nnls(rows / measured[:, None], np.ones(len(chosen)))
        error = float(np.sqrt(np.mean((rows @ coefficients / measured - 1) ** 2)))
        if best is None or error < best[0] - 1e-9:
            best = error, shape, coefficients
    _, shape, coefficients = best
    return cpu_time.CpuConstants.from_coefficients(coefficients, shape)


def _nnls(a: np.ndarray, b: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Non-negative least squares (Lawson-Hanson active set), min |a x - b| with x >= 0."""
    n = a.shape[1]
    x, passive = np.zeros(n), np.zeros(n, dtype=bool)
    for _ in range(iterations):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max(initial=0) <= 1e-12:
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            shrink = passive & (z <= 0)
            alpha = np.min(x[shrink] / (x[shrink] - z[shrink]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x


def predict_run(run: dict, constants: dict) -> tuple[float | None, float | None]:
    """(TTFT s, decode tok/s) the time model predicts for a recorded run with `constants`, at
    the run's prefill chunk."""
    if run["isa"] not in constants:
        return None, None
    cpu, config, prompt = CpuSpec(run["threads"], run["isa"]), config_of(run["model"]), run["prompt_tokens"]
    ttft = cpu_time.cpu_prefill_breakdown(cpu, config, prompt, 1, run["prefill_chunk"], 1, constants)
    step = cpu_time.cpu_decode_breakdown(cpu, config, prompt, 1, 1, constants)
    return ttft["prefill_s"], 1 / step["decode_step_s"]


def summary(steps: list[dict], constants: dict) -> None:
    """Per CPU, thread count and timing: how many steps, and their errors' RMS and worst."""
    groups: dict[tuple, list[float]] = {}
    for s in steps:
        c = constants.get(s["isa"])
        if c is None:
            continue
        predicted = cpu_time.cpu_step_seconds(c, config_of(s["model"]), s["tokens"], s["start"],
                                              s["threads"])
        key = (s["cpu_model"], s["logical_cpus"], s["threads"], s["timing"])
        groups.setdefault(key, []).append(predicted / s["seconds"] - 1)
    print("| CPU | cores | threads | timing | steps | RMS error | worst |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (cpu, cores, threads, timing), errors in groups.items():
        errors = np.array(errors)
        worst = errors[np.argmax(np.abs(errors))]
        print(f"| {cpu} | {cores} | {threads} | {timing} | {len(errors)} "
              f"| {100 * np.sqrt(np.mean(errors ** 2)):.0f}% | {100 * worst:+.0f}% |")


def report(steps: list[dict], runs: list[dict], constants: dict) -> None:
    print("| model | threads | CPU | T | S | measured | predicted | error | timing |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for s in steps:
        c = constants.get(s["isa"])
        predicted = (cpu_time.cpu_step_seconds(c, config_of(s["model"]), s["tokens"], s["start"],
                                                 s["threads"]) if c else None)
        print(f"| {s['model']} | {s['threads']} | {s['cpu_model'][:24]} | {s['tokens']} | {s['start']} "
              f"| {s['seconds'] * 1e3:.2f} ms | {_ms(predicted)} | {_pct(predicted, s['seconds'])} |"
              f" {s['timing']} |")
    if runs:
        print()
        print("| model | threads | CPU | prompt | chunk | TTFT measured | predicted | error | decode tok/s "
              "measured | predicted | error | timing |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        ttft, rate = predict_run(r, constants)
        print(f"| {r['model']} | {r['threads']} | {r['cpu_model'][:24]} | {r['prompt_tokens']} "
              f"| {r['prefill_chunk']} | {r['ttft_s']:.2f} s | {_fmt(ttft)} s "
              f"| {_pct(ttft, r['ttft_s'])} | {r['decode_tokens_per_s']:.1f} | {_fmt(rate)} "
              f"| {_pct(rate, r['decode_tokens_per_s'])} | {r['timing']} |")


def _ms(seconds) -> str:
    return "unknown" if seconds is None else f"{seconds * 1e3:.2f} ms"


def _pct(predicted, measured) -> str:
    return "-" if predicted is None or not measured else f"{100 * (predicted / measured - 1):+.0f}%"


def format_constants(fitted: dict) -> str:
    """The CPU_CONSTANTS block of facli/planner/cpu_time.py for `fitted`."""
    lines = ["CPU_CONSTANTS: dict[str, CpuConstants] = {"]
    for isa, c in fitted.items():
        values = ", ".join(f"{f.name}={_literal(getattr(c, f.name))}" for f in fields(c))
        lines.append(f"    {isa!r}: CpuConstants(".replace("'", '"'))
        lines += textwrap.wrap(values + "),", 100, initial_indent=" " * 8, subsequent_indent=" " * 8)
    return "\n".join(lines + ["}"]) + "\n"


def _literal(value: float) -> str:
    return 'float("inf")' if value == float("inf") else repr(value)


def write_constants(fitted: dict) -> Path:
    """Replace facli/planner/cpu_time.py's CPU_CONSTANTS block with `fitted`."""
    path = HERE.parent / "facli" / "planner" / "cpu_time.py"
    text = path.read_text()
    block = re.compile(r"^CPU_CONSTANTS: dict\[str, CpuConstants\] = \{\n.*?^\}\n", re.S | re.M)
    assert len(block.findall(text)) == 1, "expected one CPU_CONSTANTS block in facli/planner/cpu_time.py"
    path.write_text(block.sub(lambda _: format_constants(fitted), text))
    return path


def fit_command(args) -> None:
    steps, runs = load_records(args.files)
    timings = tuple(args.timings.split(","))

    def scaling(isa):
        if not args.keep_scaling:
            return None
        if isa not in cpu_time.CPU_CONSTANTS:  # thread scaling is measured on one ISA only
            print(f"{isa}: no thread scaling of its own; keeping {cpu_time.NOMINAL_ISA}'s\n")
            return cpu_time.CPU_CONSTANTS[cpu_time.NOMINAL_ISA].scaling
        return cpu_time.CPU_CONSTANTS[isa].scaling

    fitted = {isa: fit(steps, isa, timings, scaling(isa)) for isa in sorted({s["isa"] for s in steps})}
    fitted = {isa: c for isa, c in fitted.items() if c is not None}
    print(format_constants(fitted))
    if args.write:
        print(f"written to {write_constants(fitted)}\n")
    print("With the constants just fitted:\n")
    summary(steps, fitted)
    print()
    report(steps, runs, fitted)
    if not args.write:
        print("\nWith the constants in facli/planner/cpu_time.py:\n")
        report(steps, runs, cpu_time.CPU_CONSTANTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", required=True)
    m.add_argument("--threads", help="comma-separated thread counts (default: torch's)")
    m.add_argument("--models", default=",".join(MODELS))
    m.add_argument("--reps", type=int, default=3)
    m.add_argument("--wait-s", type=float, default=0.0,
                   help="how long each step and run may wait for the machine to be quiet")
    m.add_argument("--no-runs", action="store_true", help="steps only")
    m.add_argument("--quick", action="store_true", help="the few steps of QUICK_STEPS")
    m.add_argument("--budget-s", type=float, default=float("inf"),
                   help="start no step or run after this many seconds")
    m.add_argument("--workdir", help="where the checkpoints are written (default: a temp dir)")
    f = sub.add_parser("fit")
    f.add_argument("files", nargs="+")
    f.add_argument("--write", action="store_true",
                   help="write the fitted constants into facli/planner/cpu_time.py")
    f.add_argument("--timings", default="quiet",
                   help="which samples to fit: quiet, or quiet,cpu_time (one-thread CPU seconds "
                        "of a busy machine)")
    f.add_argument("--keep-scaling", action="store_true",
                   help="keep facli/planner/cpu_time.py's thread scaling and refit the one-thread "
                        "costs alone (records of one thread count)")
    args = parser.parse_args()
    measure(args) if args.command == "measure" else fit_command(args)


if __name__ == "__main__":
    main()
