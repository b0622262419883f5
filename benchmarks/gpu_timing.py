"""Timing helpers shared by the GPU benchmark scripts: CUDA-event medians and CUDA-graph replays."""

import sys

import torch


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def median_ms(fn, budget_s=0.5, max_reps=50):
    """Median of event-timed calls after one warm-up (compilation) and one estimate."""
    fn()
    torch.cuda.synchronize()
    times = []
    reps = None
    while reps is None or len(times) < reps:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if reps is None:
            reps = max(2, min(max_reps, int(budget_s * 1e3 / max(times[0], 1e-3))))
    times.sort()
    return times[len(times) // 2]


def _captured(fns):
    """One CUDA graph running the fns in turn, after a warm-up (compilation) outside the capture."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def _median_replay_ms(graphs, reps):
    """Median event-timed replay, the graphs replayed in turn."""
    times = []
    for i in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graphs[i % len(graphs)].replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def graph_ms(fns, reps=200):
    """Median replay time of CUDA graphs, one per input set, replayed in turn."""
    return _median_replay_ms([_captured([fn]) for fn in fns], reps)


def sequence_graph_ms(fns, calls=8, reps=50):
    """Median time per call of one CUDA graph that runs the fns in turn, `calls` of them (the
    list repeated as needed): the replay's own launch cost (about 17 us on an H200) is shared by
    the calls, as in the model's decode graph, which holds every layer's attention."""
    fns = (fns * calls)[:max(calls, len(fns))]
    return _median_replay_ms([_captured(fns)], reps) / len(fns)


def try_graph_ms(fns, timer=graph_ms):
    try:
        return timer(fns)
    except Exception as exc:
        log(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        torch.cuda.synchronize()
        return None


def try_ms(fn, **kw):
    try:
        return median_ms(fn, **kw)
    except Exception as exc:  # a backend that rejects the shape shows as '-'
        log(f"  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        torch.cuda.empty_cache()
        return None
