"""Decode steps captured once in a CUDA graph and replayed: one launch instead of hundreds.

At batch 1 a decode step of a 7B model is a few milliseconds of memory traffic spread over
several hundred small kernels; launching them one by one from Python costs as much again.
"""

import torch

from facli.model import CausalLM


class GraphedDecodeStep:
    """Replays model(token, position, kv) for any position, with the token and position copied
    into static device tensors. Captured at the first call, from real inputs: the warm-up and
    the capture write the same K/V the real step writes, so nothing in the cache is disturbed."""

    def __init__(self, model: CausalLM, kv):
        self.model, self.kv = model, kv
        self.graph = None
        self.token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        self.position = torch.zeros(1, dtype=torch.long, device=model.device)
        self.logits = None

    @staticmethod
    def supported(model: CausalLM, kv) -> bool:
        # NCCL collectives of tensor-parallel ranks are captured too (their communicator is set
        # up by the eager warm-up first); gloo ranks run on CPUs, where there are no graphs.
        # float32 attention runs the PyTorch reference, which is not written for capture.
        half = model.dtype in (torch.float16, torch.bfloat16)
        return model.device.type == "cuda" and half and getattr(kv, "graph_safe", False)

    def __call__(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        self.token.copy_(tokens.view(1, 1))
        self.position.fill_(position)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile Triton kernels and settle allocations outside the graph
                self.model(self.token, self.position, self.kv)
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.model(self.token, self.position, self.kv)
