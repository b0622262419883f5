"""The KV stores: what the model needs from a cache (store.KVStore), the cache that keeps every
layer on the run's device (device_cache), and the offloaded store whose host layers live in
pinned host memory (kv_store, with kv_parts, packed_slots, cooperative_decode, streams, fp8 and
the CPU-side attention of cpu_attention). build.build_kv_store picks the one a plan describes."""
