"""sCD and sCT on the exact Gaussian-mixture problem, trained end to end (slow tier).

The numbers in docs/method.md come from ``python benchmarks/toy_gmm.py`` (the same recipe).
"""

from __future__ import annotations

import pytest

from scm_jax.toy import recipes


@pytest.mark.slow
def test_scd_with_the_exact_teacher_learns_the_flow_map(optimized):
    m = recipes.run("scd")
    print("sCD:", m)
    assert m["flow_map_error"] < 0.1
    # 2 steps at least as close to the data as 1 step, within the metric's own noise floor.
    assert m["sw_2step"] <= m["sw_1step"] + m["sw_data_floor"]
    assert m["sw_1step"] < 0.25 * m["sw_noise"]


@pytest.mark.slow
def test_sct_from_scratch_samples_the_mixture(optimized):
    m = recipes.run("sct")
    print("sCT:", m)
    # Stated threshold: 2-step samples within 0.05 sliced-W2 of the data (the prior N(0, sigma_d^2)
    # is ~0.15 away, the exact teacher's samples ~0.02 at 8192 samples).
    assert m["sw_2step"] < 0.05
    assert m["sw_1step"] < 0.5 * m["sw_noise"]
