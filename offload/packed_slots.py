"""Packed staging slots of OffloadedKVStore (the module docstring of offload.kv_store says
when they apply): while no host layer holds more than packed_slot_rows positions, the two
staging slots keep every host layer's rows at once, each in its own share of a slot's rows.
"""


class PackedSlots:
    """The packed-slot paths of OffloadedKVStore, which holds the state they use: the staging
    slots and their shares (_slots, _staged, _per_slot, _region_rows), whether the store is
    packed (_packed), the host parts and the copy queues."""

    @property
    def packed(self) -> bool:
        """Whether every host layer's rows sit in the staging slots at once: until a host layer
        holds more than packed_slot_rows, after a reset."""
        return self._packed

    def _region(self, layer, stop):
        """(keys, values) of the slot rows that keep `layer`'s positions while the store is
        packed and they hold `stop`; None for GPU layers and once unpacked. The first host
        layer to outgrow its rows unpacks the store until the next reset."""
        if not self._packed or self._host[layer] is None:
            return None
        if stop > self._region_rows:
            self._unpack()
            return None
        slot_index, place = divmod(self._staged.index(layer), self._per_slot)
        slot = self._slots[slot_index]
        rows = slice(place * self._region_rows, (place + 1) * self._region_rows)
        return slot.keys[:, rows], slot.values[:, rows]

    def _unpack(self) -> None:
        """From now on slots hold one layer each, loaded from host memory: prefetches may
        overwrite the packed rows once the attention already queued on them has run."""
        self._packed = False
        freed = [self.queues.mark()]
        for slot in self._slots:
            slot.layer, slot.length, slot.free = None, 0, freed

    def _attend_packed(self, layer, q, chunk, start, stop, keys, values):
        self._into_rows(keys, values, chunk, start, stop)
        self._write_back(layer, chunk, start, stop)
        return self._gpu_attention(q, keys, values, start, stop)
