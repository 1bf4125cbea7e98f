"""The built-in passes and evaluators, listed in one place above the core.

Importing a plugin module registers it (`@register_pass`, `@register_evaluator`); the core never imports plugins,
so whatever runs recipes (the runner, the CLI, tests) imports this module first. Heavy dependencies stay lazy:
bitsandbytes and lm-eval are imported only when their pass or evaluator runs.
"""

from compress.compressors import rtn  # noqa: F401  (rtn)
from compress.compressors import gptq  # noqa: F401  (gptq)
from compress.compressors import awq, smoothquant  # noqa: F401  (awq, smoothquant)
from compress.compressors import bnb  # noqa: F401  (bnb)
from compress.compressors import magnitude, owl, sparsegpt, wanda  # noqa: F401  (magnitude, owl, sparsegpt, wanda)
from compress.compressors import layer_drop, width_prune  # noqa: F401  (layer_drop, width_prune)
from compress.compressors import allocate  # noqa: F401  (allocate, quantize_plan)
from compress.evaluators import perplexity  # noqa: F401  (perplexity)
from compress.evaluators import zero_shot  # noqa: F401  (zero_shot)
from compress.evaluators import lm_eval_adapter  # noqa: F401  (lm_eval)
