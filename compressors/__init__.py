"""Compression algorithms. Each module holds one algorithm: a pure tensor function plus a registered pass."""

from compressors import rtn  # noqa: F401  (registers the pass)
from compressors import gptq  # noqa: F401
from compressors import awq, smoothquant  # noqa: F401
from compressors import allocate  # noqa: F401  (allocate, quantize_plan)
