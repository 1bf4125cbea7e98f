"""Compression algorithms (installed as `compress.compressors`). Each module holds one algorithm: a pure tensor
function plus the pass that applies it. Their configs live in `configs.py`, which imports no torch, so recipes
validate without it; the built-ins are declared in `compress.app.builtins`."""
