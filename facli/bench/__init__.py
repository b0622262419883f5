"""`facli bench`: facli's speed and memory per context depth, next to its plan's predictions
and to transformers' own model on the same device.

request (what to measure, and what both sides share) -> measure (facli, on each rank) and
baseline (transformers) -> run (both, in turn) -> report (derived figures, the table),
plot (a PNG), environment (where and with what it ran).
"""
