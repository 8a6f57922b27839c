"""Feature-map profiling: shapes and formulas, liveness peak memory, streaming channel statistics."""
