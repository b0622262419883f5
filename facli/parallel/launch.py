"""Start tensor-parallel ranks: inside an existing torchrun launch, or as processes facli spawns.

    result = launch(fn, (a, b), world_size=N, device_type="cuda")

runs fn(parallel, a, b) once per rank, parallel being that rank's ParallelContext, and returns
rank 0's result. Only rank 0 writes to stdout; the other ranks' stdout goes to /dev/null. If any
rank raises, the others are ended and the caller gets a FacliError naming the rank and its error.
"""

import gc
import multiprocessing
import os
import pickle
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from facli.errors import FacliError
from facli.parallel.context import SINGLE_PROCESS, ParallelContext

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
DEFAULT_TIMEOUT_S = 1800.0  # a collective that waits this long for a peer fails
FAILURE_GRACE_S = 0.5  # after a first failure, how long to wait for the others' reports
FINISH_GRACE_S = 60.0  # after rank 0 succeeds, how long the others may take to wind down
# NVLink multicast (NVLS) can take a host's shared GPUs out of service; facli never uses it.
CUDA_RANK_ENVIRONMENT = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}

_current = SINGLE_PROCESS


@dataclass(frozen=True)
class GroupOptions:
    """How each rank joins the process group."""

    device_type: str  # "cuda": NCCL, one GPU per rank; "cpu": gloo
    timeout_s: float  # a collective that waits this long for a peer fails
    high_priority_comm: bool  # NCCL collectives on a high-priority stream (see launch)


class RankFailedError(FacliError):
    """A tensor-parallel rank raised something other than a FacliError (its traceback is on stderr)."""


def current_context() -> ParallelContext:
    """This process's rank inside `launch`; the single-process context outside it."""
    return _current


def under_torchrun() -> bool:
    """True when torchrun's environment variables say this process is one rank of a launch."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def prints_here() -> bool:
    """Whether this process reports to the user before `launch`: always, except the ranks
    other than 0 of a torchrun launch, which each run the whole command."""
    return not under_torchrun() or os.environ["RANK"] == "0"


def launch(fn, args: tuple = (), kwargs: dict | None = None, *, world_size: int,
           device_type: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
           high_priority_comm: bool = False):
    """Run fn(parallel, *args, **kwargs) on `world_size` ranks and return rank 0's result.

    device_type "cuda": one GPU per rank, NCCL; "cpu": gloo ranks on this machine.
    Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR set) the process group comes from
    its environment, fn runs in this process, and each rank gets its own result back.
    Otherwise facli spawns the ranks (fn and args must be picklable: a module-level function);
    world_size 1 runs fn here with no distributed setup. timeout_s bounds every collective.
    high_priority_comm puts NCCL's collectives on a high-priority CUDA stream, so that the block
    scheduler gives them SMs ahead of the GEMMs they are meant to overlap.
    """
    if device_type not in ("cpu", "cuda"):
        raise FacliError(f"expected device type cpu or cuda, got {device_type!r}")
    if world_size < 1:
        raise FacliError(f"expected --devices >= 1, got {world_size}")
    kwargs = kwargs or {}
    group = GroupOptions(device_type, timeout_s, high_priority_comm)
    if under_torchrun():
        return _run_under_torchrun(fn, args, kwargs, world_size, group)
    if world_size == 1:
        return _run_here(SINGLE_PROCESS, fn, args, kwargs)
    if device_type == "cuda":
        available = torch.cuda.device_count()
        if world_size > available:
            raise FacliError(
                f"expected at most {available} ranks on this machine's {available} GPU(s), got "
                f"--devices {world_size}; lower --devices"
            )
    return _spawn(fn, args, kwargs, world_size, group)


def _run_here(parallel: ParallelContext, fn, args, kwargs):
    global _current
    previous, _current = _current, parallel
    try:
        return fn(parallel, *args, **kwargs)
    finally:
        _current = previous


def _run_under_torchrun(fn, args, kwargs, world_size, group: GroupOptions):
    world = int(os.environ["WORLD_SIZE"])
    if world != world_size:
        raise FacliError(
            f"expected --devices to match torchrun's WORLD_SIZE ({world}), got {world_size}; "
            f"pass --devices {world} or change torchrun's --nproc-per-node"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if world == 1:
        return _run_here(SINGLE_PROCESS, fn, args, kwargs)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    parallel = ParallelContext(rank, world, local_rank)
    _init_process_group(parallel, group, "env://")
    try:
        return _run_here(parallel, fn, args, kwargs)
    finally:
        # Free what the run left in reference cycles (CUDA graphs over the communicator among
        # them) before destroying it. Spawned ranks skip the destroy instead (_rank_main); this
        # path returned after graphed decode on 2 H200s (`torchrun -m facli.cli generate`).
        gc.collect()
        if group.device_type == "cuda":
            torch.cuda.synchronize()
        dist.destroy_process_group()


def _init_process_group(parallel: ParallelContext, group: GroupOptions, init_method: str) -> None:
    options = {}
    if group.device_type == "cuda":
        os.environ.update(CUDA_RANK_ENVIRONMENT)
        torch.cuda.set_device(parallel.local_rank)
        options["device_id"] = torch.device("cuda", parallel.local_rank)
        if group.high_priority_comm:
            options["pg_options"] = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    dist.init_process_group(
        "nccl" if group.device_type == "cuda" else "gloo", init_method=init_method, rank=parallel.rank,
        world_size=parallel.world_size, timeout=timedelta(seconds=group.timeout_s), **options,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(fn, args, kwargs, world_size, group: GroupOptions):
    context = multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    processes, readers = [], []
    try:
        for rank in range(world_size):
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(
                target=_rank_main, name=f"facli-rank-{rank}",
                args=(rank, world_size, group, init_method, fn, args, kwargs, writer),
            )
            process.start()
            writer.close()
            processes.append(process)
            readers.append(reader)
        return _collect(processes, readers)
    finally:
        _stop(processes)


def _collect(processes, readers):
    """Wait for every rank's report; on the first failure, end the rest and raise."""
    reports: dict[int, tuple] = {}
    deadline = None  # set by a first failure, or by rank 0's success
    while len(reports) < len(processes):
        waiting = [rank for rank in range(len(processes)) if rank not in reports]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait([readers[r] for r in waiting] + [processes[r].sentinel for r in waiting], timeout)
        if not ready:
            break
        for rank in waiting:
            if readers[rank] in ready or processes[rank].sentinel in ready:
                reports[rank] = _read_report(rank, readers[rank], processes[rank])
                if reports[rank][0] == "error":
                    deadline = min(deadline or float("inf"), time.monotonic() + FAILURE_GRACE_S)
                elif rank == 0 and deadline is None:
                    deadline = time.monotonic() + FINISH_GRACE_S
    failures = {rank: payload for rank, (status, payload) in reports.items() if status == "error"}
    if failures:
        _stop(processes)
        raise _failure(failures, len(processes))
    return reports[0][1]


def _read_report(rank, reader, process) -> tuple:
    if reader.poll():
        try:
            return pickle.loads(reader.recv_bytes())
        except (EOFError, OSError):
            pass
    process.join(timeout=5)
    code = process.exitcode
    return "error", {"type": "ProcessExit", "message": f"exited with code {code} before reporting",
                     "error": None, "time": 0.0}  # died without a word: the likely cause


def _failure(failures: dict, world_size: int) -> FacliError:
    """The error to show: a FacliError if any rank raised one, else the one raised first (the
    others are usually peers failing in a collective because that rank went away)."""
    user = [rank for rank, payload in sorted(failures.items()) if payload["error"] is not None]
    rank = user[0] if user else min(failures, key=lambda r: (failures[r]["time"], r))
    payload = failures[rank]
    where = f"rank {rank} of {world_size}"
    if payload["error"] is not None:
        original = payload["error"]
        try:
            return type(original)(f"{where}: {original}")
        except TypeError:
            return FacliError(f"{where}: {original}")
    return RankFailedError(
        f"{where} failed: {payload['type']}: {payload['message']} (its traceback is on stderr)"
    )


def _stop(processes) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + 5
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(timeout=5)


def _rank_main(rank, world_size, group: GroupOptions, init_method, fn, args, kwargs, writer):
    """One spawned rank: join the group, run fn, send (status, payload) back to the launcher."""
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    if group.device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        parallel = ParallelContext(rank, world_size, local_rank=rank)
        _init_process_group(parallel, group, init_method)
        result = _run_here(parallel, fn, args, kwargs)
        report = pickle.dumps(("ok", result if rank == 0 else None))
        # No destroy_process_group: after decode steps captured NCCL collectives in a CUDA
        # graph, destroying the communicator blocked forever on 2 H200s (NCCL 2.28). The
        # process ends right after reporting, and its exit releases the communicator.
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the launcher
        if not isinstance(exc, FacliError):
            print(f"facli rank {rank} of {world_size}:\n{traceback.format_exc()}", file=sys.stderr)
        report = pickle.dumps(("error", _describe(exc)))
        _send_and_exit(writer, report, code=1)
    _send_and_exit(writer, report, code=0)


def _describe(exc: BaseException) -> dict:
    user_error = None
    if isinstance(exc, FacliError):
        try:
            user_error = pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - an unpicklable subclass still carries its message
            user_error = FacliError(str(exc))
    return {"type": type(exc).__name__, "message": str(exc), "error": user_error, "time": time.time()}


def _send_and_exit(writer, report: bytes, code: int) -> None:
    try:
        writer.send_bytes(report)
        writer.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: after a failed collective, NCCL's destructors can block.
        os._exit(code)
