"""Compression algorithms. Each module holds one algorithm: a pure tensor function plus a registered pass."""

from compressors import rtn  # noqa: F401  (registers the pass)
