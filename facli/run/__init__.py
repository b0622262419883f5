"""Running a plan on this machine: place it, load the model, prefill and decode.

placement fits a planner's Plan to this run (hardware, the degree of --devices auto, weight
dtype, tensor-parallel settings); runtime loads this rank's shards into the model and the KV
store the plan describes and runs it; engine is the loop (prefill in chunks, then decode one
token at a time), batching the same loop over many prompts in rows of one KV cache, graphs the
decode steps captured in CUDA graphs, and sampling the choice of each next token.
"""
