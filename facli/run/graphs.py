"""Decode steps captured in CUDA graphs and replayed: a few launches instead of hundreds.

At batch 1 a decode step of a 7B model is a few milliseconds of memory traffic spread over
several hundred small kernels; launching them one by one from Python costs as much again.

A KV store names the layers whose decode step is device work only (`graph_layers`): every layer
of an all-GPU cache, the GPU layers of an offloaded one. Only the KV store's part of the other
layers (host-resident KV: copies chosen by position, attention that may wait on the CPU) runs
eagerly. The step is cut at those attentions into segments, one graph each:

    embedding, layers 0..h1-1, norm + q/k/v of h1     -> eager: h1's KV store attends
    o_proj + MLP of h1, layers h1+1..h2-1, q/k/v of h2 -> eager: h2's KV store attends
    ...
    o_proj + MLP of hn, layers hn+1..L-1, norm + LM head

so a host layer costs the host only its KV store's launches.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from facli.models.llama import CausalLM


@dataclass
class Segment:
    """Part of a decode step between two eager attentions. `after`: the host layer whose
    attention output it starts from (None: from the token); `before`: the host layer whose
    q, k, v it ends with (None: with the logits); `layers`: the whole layers in between."""

    after: int | None
    layers: range
    before: int | None
    graph: object = None
    inputs: tuple = ()
    outputs: tuple = field(default_factory=tuple)


def plan_segments(num_layers: int, graph_layers) -> list[Segment]:
    """One segment more than there are layers outside graph_layers."""
    eager = [layer for layer in range(num_layers) if layer not in graph_layers]
    bounds = [None, *eager, None]
    return [Segment(after, range(0 if after is None else after + 1,
                                 num_layers if before is None else before), before)
            for after, before in zip(bounds, bounds[1:])]


class GraphedDecodeStep:
    """Replays model(tokens, positions, kv) for the kv store's B sequences at any positions,
    with tokens and positions copied into static device tensors. Captured at the first call,
    from real inputs: the warm-up and the capture write K/V at the positions the real step then
    writes again, so nothing in the cache is disturbed; the eager attentions are not run until
    the real step."""

    def __init__(self, model: CausalLM, kv):
        self.model, self.kv = model, kv
        device = model.device
        self.batch = getattr(kv, "batch", 1)
        self.token = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(self.batch, dtype=torch.long, device=device)
        self.segments = plan_segments(len(model.layers), kv.graph_layers)
        width = model.layers[0].self_attn.local_q_heads * model.config.head_dim
        for segment in self.segments:
            if segment.after is None:
                segment.inputs = (self.token,)
            else:  # the layer input comes from the previous graph's output, in place
                segment.inputs = (None, torch.zeros(self.batch, 1, width, dtype=model.dtype,
                                                    device=device))
        self.captured = False

    @staticmethod
    def supported(model: CausalLM, kv) -> bool:
        # NCCL collectives of tensor-parallel ranks are captured too (their communicator is set
        # up by the eager warm-up first); gloo ranks run on CPUs, where there are no graphs.
        # float32 attention runs the PyTorch reference, which is not written for capture.
        half = model.dtype in (torch.float16, torch.bfloat16)
        return model.device.type == "cuda" and half and bool(getattr(kv, "graph_layers", ()))

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, position) -> torch.Tensor:
        """tokens [B] at `position`: an int (every sequence there) or a [B] device tensor."""
        self.token.copy_(tokens.view(self.batch, 1))
        if isinstance(position, torch.Tensor):
            self.position.copy_(position)
        else:
            self.position.fill_(position)
        if not self.captured:
            self._capture()
        for segment in self.segments:
            if segment.after is not None:
                segment.inputs[1].copy_(self.attend(segment.after, previous.outputs, position))
            segment.graph.replay()
            previous = segment
        return previous.outputs[0]

    def attend(self, layer: int, projected: tuple, position):
        """The KV store's part of `layer`: its attention output [B, 1, local heads * D] for
        projected = (x, q, k, v) of the segment before."""
        _, q, k, v = projected
        # The store may still be copying k, v to host memory on a side stream when the next
        # replay rewrites the graph's outputs: it gets copies, which the allocator keeps alive.
        return self.kv.attend(layer, q, k.clone(), v.clone(), position).reshape(self.batch, 1, -1)

    def execute(self, segment: Segment, inputs: tuple, position) -> tuple:
        """The segment's pieces: (logits,) at the end of the step, else (x, q, k, v) of the
        next host layer. inputs: (token,) or (layer input x, attention output)."""
        model = self.model
        if segment.after is None:
            x = model.embed_tokens(inputs[0])
        else:
            x = model.layers[segment.after].tail(*inputs)
        cos, sin = model.rotary.cos_sin(position, 1, model.dtype)
        for index in segment.layers:
            x = model.layers[index](x, cos, sin, self.kv, index, position)
        if segment.before is None:
            return (model.head(x)[:, -1],)
        return (x, *model.layers[segment.before].project(x, cos, sin))

    def _capture(self) -> None:
        device = self.model.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile Triton kernels and settle allocations outside the graph
                self._run_segments(lambda segment: nullcontext())
        torch.cuda.current_stream(device).wait_stream(side)
        # One pool: the graphs replay in capture order, one at a time, and what one hands the
        # next (its outputs) stays allocated.
        pool = torch.cuda.graph_pool_handle()

        def capture(segment):
            segment.graph = torch.cuda.CUDAGraph()
            return torch.cuda.graph(segment.graph, pool=pool)

        self._run_segments(capture)
        self.captured = True

    def _run_segments(self, context) -> None:
        """Each segment on its static inputs inside context(segment), the previous segment's x
        output as the next one's layer input; no eager attention."""
        previous = None
        for segment in self.segments:
            if segment.after is not None:
                segment.inputs = (previous.outputs[0], segment.inputs[1])
            with context(segment):
                segment.outputs = self.execute(segment, segment.inputs, self.position)
            previous = segment
