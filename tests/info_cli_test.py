"""`scm-jax info` / `scm-jax config`: numbers on abstract shapes, JSON output, clear errors."""

from __future__ import annotations

import json
import math

import pytest

from scm_jax import cli, configlib
from scm_jax.info import model_info


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info_json_has_the_promised_keys(capsys):
    argv = ["info", "--config", "configs/mnist.py:smoke", "--json", "--devices", "2"]
    rc, out, _ = run_cli(capsys, *argv)
    assert rc == 0
    info = json.loads(out)
    for key in ("params", "forward_gflops", "jvp_gflops", "train_step_gflops", "state_bytes"):
        assert key in info
    assert info["devices"] == 2
    assert info["state_bytes_per_device"] == math.ceil(info["state_bytes"] / 2)
    assert set(info["train_step_gflops"]) == {"diffusion", "sct", "scd", "scd_cfg"}
    assert 1.9 < info["jvp_over_forward"] < 2.5  # attention weighs more in a tiny network


def test_info_table_and_overrides(capsys):
    rc, out, _ = run_cli(capsys, "info", "--config=toy_gmm:smoke", "--config.model.hidden=64")
    assert rc == 0 and "parameters" in out and "GFLOP" in out
    argv = ["config", "--config", "toy_gmm:smoke", "--config.model.hidden", "64"]
    rc, out, _ = run_cli(capsys, *argv)
    assert rc == 0 and "hidden: 64" in out


@pytest.mark.slow
def test_info_of_the_1p5b_xxl_scd_model():
    info = model_info(configlib.load_config("imagenet512:size=xxl,objective=scd"), devices=64)
    added = info["params_added_by_scm_conditioning"]
    assert info["params_stock_edm2"] / 1e6 == pytest.approx(1523.4, rel=3e-3)
    assert info["params"] == info["params_stock_edm2"] + added + info["params_weight_head"]
    assert info["forward_gflops"] == pytest.approx(1093.8, rel=0.03)
    assert 1.98 < info["jvp_over_forward"] < 2.05  # symbolic-zero weight tangents (reference A3)
    F, steps = info["forward_gflops"], info["train_step_gflops"]
    for objective, n_forwards in (("diffusion", 3), ("sct", 5), ("scd", 6), ("scd_cfg", 7)):
        assert steps[objective] / F == pytest.approx(n_forwards, rel=0.02), objective
    assert info["train_step_objective"] == "scd_cfg"
    b = info["state_bytes_breakdown"]
    assert b["params"] == 4 * info["params"] and b["optimizer"] == 2 * b["params"]
    assert b["ema"] == 2 * b["params"] and b["teacher"] == 4 * info["params_teacher"]
    assert info["state_bytes"] == sum(b.values())
    assert info["state_bytes_per_device"] == math.ceil(info["state_bytes"] / 64)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["info", "--config", "imagenet512:size=xxxl"], "unknown size 'xxxl'"),
        (["info", "--config", "mnist:foo=1"], "unknown config argument 'foo'"),
        (["info", "--config", "nope.py"], "config file 'nope.py' not found"),
        (
            ["info", "--config", "mnist", "--config.model.bogus=1"],
            "unknown config field 'model.bogus'",
        ),
        (["info", "--config", "mnist", "--config.model.dropout=abc"], "could not convert"),
        (["info", "--config", "mnist", "--config.model.dropout=1.5"], "dropout=1.5 must be in"),
        (["info", "--config", "mnist", "--devices", "0"], "--devices must be >= 1"),
        (["info"], "--config is required"),
        (["frobnicate", "--config", "mnist"], "unknown command 'frobnicate'"),
    ],
)
def test_cli_errors_are_one_clear_line(capsys, argv, message):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err
