"""Layer 1, the floor: what a recipe is. Errors and exit codes, the pass/evaluator registry, the recipe schema and
its YAML-with-line-marks loader, the export schema. Imports nothing else of ours; torch only for types."""
