"""Decode of host layers with the CPU attending to their rows in host memory: OffloadedKVStore's
"cpu" and "split" decode modes (offload.kv_store holds the rest of the data flow).

Decode over a host layer, decode_mode="cpu":
  q (8 KiB) and the new K/V go to the host, the CPU computes attention over the host rows with
  PyTorch's threads (offload.cpu_attention: bandwidth-bound, ~len * 16 KiB of DRAM reads per
  layer), and out + log-sum-exp (16 KiB) come back. The GPU attends to the layer's first
  `gpu_prefix_tokens` positions at the same time and the two parts are merged with LSE. What
  overlaps, honestly: with gpu_prefix_tokens = 0 the GPU waits for the CPU in every host
  layer, since layer i + 1 needs layer i's output; only the GPU prefix part runs concurrently.
  No staging slot is read in this mode (slots are still used by prefill).

Decode over a host layer, decode_mode="split" (both ways out of host memory at once):
  A host layer's rows are divided at a boundary: the staging slot holds [0, boundary),
  prefetched over PCIe as in "prefetch" mode, and the CPU attends [boundary, len) in host memory
  as in "cpu" mode; the two parts are merged with LSE. The boundary leaves `cpu_share` of the
  host rows to the CPU. The next host layer's prefetch is queued before the CPU starts, so the
  PCIe copy of one layer runs while the CPU reads another: on a 16-core H200 host the two
  read 96 GB/s while both run (copies 52, CPU 44) against 55 and 50 alone
  (benchmarks/offload.py), so the layer's host bytes take about 0.6 of either mode's time.
"""

from facli.kernels import decode_attention, merge_attention
from facli.offload.cpu_attention import cpu_suffix_attention
from facli.offload.streams import pinned_copy


class CooperativeDecode:
    """The "cpu" and "split" decode paths of OffloadedKVStore, which holds the state they use:
    the layers' GPU and host parts (_dev, _host, _split), the copy queues, the staging slots
    (_stage, _prefetch_after), written positions and their events (_written, _layer_event,
    _wrote) and cpu_share."""

    def _attend_on_cpu(self, layer, q, chunk, start, stop):
        split = self._split[layer]

        def gpu_part():
            return self._part_attention(q, self._dev[layer], split) if split > 0 else None

        return self._cpu_suffix(layer, q, chunk, start, stop, split, gpu_part)

    def _attend_split(self, layer, q, chunk, start, stop):
        slot = self._stage(layer, self._pcie_rows(layer))
        boundary = slot.length  # at least the PCIe share: a slot may hold more, never past start

        def gpu_part():
            part = None
            if boundary > 0:
                self._prefix_lens.fill_(boundary)
                part = decode_attention(q, slot.keys[:, :boundary], slot.values[:, :boundary],
                                        self._prefix_lens, return_lse=True)
            slot.free = [self.queues.mark()]
            # Queued before the CPU starts: the next layer's rows cross PCIe while it works.
            self._prefetch_after(layer, slot, rows_of=self._pcie_rows)
            return part

        return self._cpu_suffix(layer, q, chunk, start, stop, boundary, gpu_part)

    def _pcie_rows(self, layer) -> int:
        """Rows [0, n) of a host layer that "split" decode reads from a staging slot."""
        split, written = self._split[layer], self._written[layer]
        return split + int((written - split) * (1 - self.cpu_share))

    def _cpu_suffix(self, layer, q, chunk, start, stop, first, gpu_part):
        """Store the decode token's K/V in host memory and attend: the CPU over positions
        first..stop (host rows), merged with gpu_part(), which queues the GPU's (out, lse) over
        positions before `first` (or returns None) while the CPU works."""
        split, queues = self._split[layer], self.queues
        host = self._host[layer]
        # The CPU reads every host row below: earlier write-backs must have landed too.
        queues.wait([self._layer_event[layer]])
        host.store(start - split, chunk, 0, 1)  # device to pinned host: queued, awaited below
        self.d2h_bytes += host.row_bytes()
        q_host = pinned_copy(q, self._pin)
        copied = queues.mark()
        self._wrote(layer, start, stop, copied)
        gpu = gpu_part()
        queues.host_wait(copied)
        rows = slice(first - split, None)
        scales = [s[:, rows] if s is not None else None for s in (host.k_scales, host.v_scales)]
        out, lse = cpu_suffix_attention(q_host, host.k[:, rows], host.v[:, rows], stop,
                                        first_position=first, k_scales=scales[0],
                                        v_scales=scales[1], workspace=self._cpu_tiles)
        out = pinned_copy(out, self._pin).to(self.device, non_blocking=True)
        if gpu is None:
            return out.to(q.dtype)
        lse = pinned_copy(lse, self._pin).to(self.device, non_blocking=True)
        return merge_attention(gpu[0], gpu[1], out, lse)[0].to(q.dtype)
