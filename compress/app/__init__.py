"""Layer 5: orchestration. The runner (`run_recipe`), sweeps of recipes, sensitivity runs, and `builtins`, the one
place that lists the built-in passes and evaluators. Imports every layer below; only `compress.cli` imports it."""
