"""bench/activation_scale.py: a short run at two scales, with the biases at the activations' scale the
same training at both."""

import pytest

from bench import activation_scale


def test_scaled_biases_train_alike_at_two_scales():
    small, large = (activation_scale.train(scale, scaled_biases=True, steps=15) for scale in (1 / 64, 64.0))
    assert small == pytest.approx(large, rel=1e-3)
    assert 0 < small < 1.5
