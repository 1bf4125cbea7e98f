"""Compression algorithms. Each module holds one algorithm: a pure tensor function plus a registered pass."""

from compressors import rtn  # noqa: F401  (registers the pass)
from compressors import gptq  # noqa: F401
from compressors import awq, smoothquant  # noqa: F401
from compressors import bnb  # noqa: F401  (bitsandbytes itself is imported only when the pass runs)
from compressors import magnitude, owl, sparsegpt, wanda  # noqa: F401
from compressors import layer_drop, width_prune  # noqa: F401
from compressors import allocate  # noqa: F401  (allocate, quantize_plan)
