"""Cost model and planner: expected prefill and pull times, and the pull / recompute /
reroute decisions built on them (pure functions, shared by the trace bench)."""
