"""Wanda where it matters: activation outlier channels.

On the plain demo model Wanda is only ~2% better than magnitude pruning at 50%: a 4.5M-parameter model has no
systematic outlier features, so |W| alone ranks weights almost as well as |W|·‖X‖. Give it such features the
function-preserving way (tests/compressors/test_smoothquant_outliers.py: a few norm gains x40, the matching
input columns /40): the fp model is unchanged, magnitude now prunes the small-but-important outlier columns,
and Wanda, whose score is invariant to that rescaling, is not fooled.
"""

import pytest

from tests.compressors.test_smoothquant_outliers import perplexity_with
from tests.conftest import requires_demo_model

pytestmark = [requires_demo_model(), pytest.mark.slow]


# One input channel in 16 becomes an outlier feature (LLMs of several billion parameters have a handful of
# such dimensions carrying most of the activation norm; here they carry a normal share, so the effect is milder).
CHANNELS = tuple(range(5, 256, 16))


def test_wanda_far_below_magnitude_when_activations_have_outliers():
    wanda = perplexity_with("[{wanda: {sparsity: 0.5}}]", channels=CHANNELS)
    magnitude = perplexity_with("[{magnitude: {sparsity: 0.5}}]", channels=CHANNELS)
    plain_wanda = perplexity_with("[{wanda: {sparsity: 0.5}}]", inject=False)
    print(f"outlier demo at 50%: wanda {wanda:.3f} (plain model {plain_wanda:.3f}), magnitude {magnitude:.3f}")
    assert wanda == pytest.approx(plain_wanda, rel=0.02)  # the rescaling does not change Wanda's masks' quality
    assert magnitude > 1.15 * wanda  # measured: 16.365 vs 13.501 (+21%); on the plain model the gap is ~1-2%
