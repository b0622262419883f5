"""The planner: model + hardware + context -> a frozen Plan (pure: it touches no device).

search.plan is the entry; plan.Plan is the contract the runtime executes. The memory model
(memory), the GPU and CPU time models (time_model, cpu_time) price each candidate placement
(candidates), and build turns the chosen one into a Plan. hardware holds the specs (recipes,
detection), and policy the run rules that the planner prices and the runtime (facli.parallel,
facli.offload) follows.
"""
