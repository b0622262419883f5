"""Decode steps captured in CUDA graphs and replayed: a few launches instead of hundreds.

At batch 1 a decode step of a 7B model is a few milliseconds of memory traffic spread over
several hundred small kernels; launching them one by one from Python costs as much again.

A KV store names the layers whose decode step is device work only (`graph_layers`): every layer
of an all-GPU cache, the GPU layers of an offloaded one. The step is cut into runs: the
embedding, the LM head and consecutive graph layers are captured together, one graph per run,
and the layers between (host-resident KV, whose copies are chosen by position and whose
attention may wait on the CPU) run eagerly from their graph's output.
"""

from dataclasses import dataclass

import torch

from facli.model import CausalLM


@dataclass
class DecodeRun:
    """Pieces first..stop of a decode step: -1 is the embedding, 0..L-1 the decoder layers and L
    the final norm and LM head. A graphed run replays `graph` from `input` into `output`."""

    graphed: bool
    first: int
    stop: int
    graph: object = None
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


def plan_runs(num_layers: int, graph_layers) -> list[DecodeRun]:
    """Maximal runs of pieces that are all captured, or all eager (layers not in graph_layers)."""
    runs: list[DecodeRun] = []
    for piece in range(-1, num_layers + 1):
        graphed = piece in (-1, num_layers) or piece in graph_layers
        if runs and runs[-1].graphed == graphed:
            runs[-1].stop = piece + 1
        else:
            runs.append(DecodeRun(graphed, piece, piece + 1))
    return runs


class GraphedDecodeStep:
    """Replays model(token, position, kv) for any position, with the token and position copied
    into static device tensors. Captured at the first call, from real inputs: the warm-up and
    the capture write K/V at the position the real step then writes again, so nothing in the
    cache is disturbed; eager layers are not run until the real step."""

    def __init__(self, model: CausalLM, kv):
        self.model, self.kv = model, kv
        self.token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        self.position = torch.zeros(1, dtype=torch.long, device=model.device)
        self.runs = plan_runs(len(model.layers), kv.graph_layers)
        for run in self.runs:
            if run.graphed:
                run.input = self.token if run.first == -1 else torch.zeros(
                    1, 1, model.config.hidden_size, dtype=model.dtype, device=model.device)
        self.captured = False

    @staticmethod
    def supported(model: CausalLM, kv) -> bool:
        # NCCL collectives of tensor-parallel ranks are captured too (their communicator is set
        # up by the eager warm-up first); gloo ranks run on CPUs, where there are no graphs.
        # float32 attention runs the PyTorch reference, which is not written for capture.
        half = model.dtype in (torch.float16, torch.bfloat16)
        return model.device.type == "cuda" and half and bool(getattr(kv, "graph_layers", ()))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(tokens.view(1, 1))
        self.position.fill_(position)
        if not self.captured:
            self._capture()
        x = None
        for run in self.runs:
            if not run.graphed:
                x = self._execute(run, x, position)
                continue
            if run.input is not self.token:
                run.input.copy_(x)
            run.graph.replay()
            x = run.output
        return x

    def _execute(self, run: DecodeRun, x, position):
        """The run's pieces on x (token ids when it starts with the embedding)."""
        model, last = self.model, len(self.model.layers)
        if run.first == -1:
            x = model.embed_tokens(x)
        layers = range(max(run.first, 0), min(run.stop, last))
        if layers:
            x = model.run_layers(x, layers, self.kv, position)
        if run.stop == last + 1:
            x = model.head(x)[:, -1]
        return x

    def _capture(self) -> None:
        device = self.model.device
        graphed = [run for run in self.runs if run.graphed]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile Triton kernels and settle allocations outside the graph
                for run in graphed:
                    self._execute(run, run.input, self.position)
        torch.cuda.current_stream(device).wait_stream(side)
        # One pool: the graphs replay in capture order, one at a time, and each run's output
        # stays alive until the next graph has read it.
        pool = torch.cuda.graph_pool_handle()
        for run in graphed:
            run.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(run.graph, pool=pool):
                run.output = self._execute(run, run.input, self.position)
        self.captured = True
