"""`scm-jax info` / `scm-jax config`: numbers on abstract shapes, exact per-device state bytes
from the sharding rules, the ahead-of-time compiled step (8 simulated CPU devices), clear errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from scm_jax import cli
from scm_jax.config import defaults
from scm_jax.info import mesh_axis_sizes, model_info, per_device_bytes
from scm_jax.info_text import format_info
from scm_jax.sharding import DEFAULT_RULES, make_mesh, state_shardings
from scm_jax.train import aot, build


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
    assert info["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}  # the config's mesh: data=-1
    assert info["state_bytes_per_device"] == info["state_bytes"]  # data parallel: replicated
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
    config = defaults.load_config("imagenet512:size=xxl,objective=scd")
    info = model_info(config, devices=64, mesh={"data": 8, "fsdp": 8})
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
    assert b["params"] == 4 * info["params"] and 0 <= b["optimizer"] - 2 * b["params"] < 64
    assert b["ema"] == 2 * 4 * info["params_net"]  # two EMAs of the network (no weight head)
    assert b["teacher"] == 4 * info["params_teacher"]
    assert info["state_bytes"] == sum(b.values())
    # fsdp=8: nearly every leaf splits 8 ways (a few small gains stay whole); data=8 replicates.
    eighth = info["state_bytes"] / 8
    assert eighth <= info["state_bytes_per_device"] < 1.001 * eighth


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
        (
            ["info", "--config", "mnist:smoke", "--devices", "8", "--mesh", "data=2,fsdp=2"],
            "ICI mesh data=2 x fsdp=2 x tensor=1 has 4 devices but there are 8",
        ),
        (["info", "--config", "mnist:smoke", "--mesh", "data:2"], "expected AXIS=SIZE pairs"),
        (["info", "--config", "mnist:smoke", "--mesh", "pipe=1"], "unknown mesh axes ['pipe']"),
        (
            ["info", "--config", "mnist:smoke", "--devices", "8", "--batch", "12"],
            "batch_size 12 is not divisible by train.micro_batches 1 x 8 batch shards",
        ),
        (
            ["info", "--config", "mnist:smoke", "--devices=4", "--batch=16", "--micro-batches=8"],
            "batch_size 16 is not divisible by train.micro_batches 8 x 4 batch shards",
        ),
        (
            ["info", "--config", "mnist:smoke", "--micro-batches", "0"],
            "train.micro_batches must be an integer >= 1, got 0",
        ),
        (
            ["info", "--config", "toy_gmm:smoke", "--remat", "block"],
            "model.remat='block' rematerialises U-Net blocks",
        ),
        (
            ["info", "--config", "toy_gmm:smoke", "--devices=16", "--batch=16", "--compile"],
            "cannot compile for 16 devices: this machine has 8 cpu device(s)",
        ),
        (["info", "--config", "toy_gmm:smoke", "--topology", "v5p-7"], "v5p sizes count 2 cores"),
        (["info", "--config", "toy_gmm:smoke", "--topology", "v9-8"], "unknown TPU topology"),
        (
            ["info", "--config", "toy_gmm:smoke", "--topology", "v5p-8", "--devices", "8"],
            "--topology v5p-8 has 4 devices but the mesh data=8 x fsdp=1 x tensor=1 has 8",
        ),
        (["info"], "--config is required"),
        (["frobnicate", "--config", "mnist"], "unknown command 'frobnicate'"),
    ],
)
def test_cli_errors_are_one_clear_line(capsys, argv, message):
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert message in err
    assert "Traceback" not in err


def test_per_device_bytes_match_a_hand_count():
    """Each leaf's shard under the rules, summed; replicated leaves count whole."""
    tree = {
        "lin": {"weight": jax.ShapeDtypeStruct((16, 8), jnp.float32)},  # (in, out)
        "conv": {"weight": jax.ShapeDtypeStruct((3, 3, 8, 6), jnp.float32)},  # (kh, kw, in, out)
        "gain": jax.ShapeDtypeStruct((5,), jnp.float32),  # unnamed; 5 % 4: stays whole
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    sizes = {"data": 2, "fsdp": 4, "tensor": 1}
    # lin: 'in' 16 / fsdp 4 -> (4, 8); conv: 'in' 8 / 4 -> (3, 3, 2, 6); data never splits weights
    hand = 4 * 8 * 4 + 3 * 3 * 2 * 6 * 4 + 5 * 4 + 4
    assert per_device_bytes(tree, sizes, DEFAULT_RULES) == hand == 584
    # tensor=2 also splits the output features: lin (4, 4), conv (3, 3, 2, 3)
    sizes = {"data": 1, "fsdp": 4, "tensor": 2}
    assert per_device_bytes(tree, sizes, DEFAULT_RULES) == 64 + 216 + 20 + 4
    assert per_device_bytes(tree, sizes, DEFAULT_RULES, replicated=True) == 512 + 1728 + 24


def test_state_bytes_per_device_equal_the_shards_jax_makes():
    """info's per-device state = the shard shapes of the real NamedShardings on a 2 x 4 mesh."""
    config = defaults.load_config("mnist:smoke")
    info = model_info(config, devices=8, mesh={"data": 2, "fsdp": 4}, flops=False)
    assert info["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert info["per_device_batch"] == config.batch_size // 8
    nd = aot.build_network(config.model)
    tx, _ = aot.make_optimizer(**config.optim, batch_size=config.batch_size)
    state = build.abstract_train_state(config, nd, tx)
    mesh = make_mesh(data=2, fsdp=4)

    def jax_bytes(tree):
        shards = jax.tree.leaves(state_shardings(tree, mesh, DEFAULT_RULES))
        leaves = jax.tree.leaves(tree)
        return sum(
            math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
            for x, s in zip(leaves, shards, strict=True)
        )

    per_device = info["state_bytes_per_device_breakdown"]
    assert per_device["params"] == jax_bytes(state.params) < info["state_bytes_breakdown"]["params"]
    assert per_device["optimizer"] == jax_bytes(state.opt_state)
    assert per_device["ema"] == jax_bytes(state.emas)
    assert per_device["teacher"] == 0  # sCT


def test_mesh_defaults_to_the_config_with_minus_one_filled():
    mesh_cfg = defaults.load_config("mnist:smoke").mesh  # data=-1, fsdp=1, tensor=1
    assert mesh_axis_sizes(mesh_cfg, 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh_axis_sizes(mesh_cfg, 8, {"fsdp": 4}) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh_axis_sizes(mesh_cfg, 8, {"data": 1, "fsdp": -1}) == {"data": 1, "fsdp": 8,
                                                                       "tensor": 1}  # fmt: skip


def test_overrides_reach_the_config(capsys):
    argv = ["info", "--config", "toy_gmm:smoke", "--devices", "4", "--mesh", "fsdp=2", "--batch",
            "32", "--micro-batches", "2", "--remat", "full", "--json"]  # fmt: skip
    rc, out, _ = run_cli(capsys, *argv)
    info = json.loads(out)
    assert rc == 0 and info["batch_size"] == 32 and info["remat"] == "full"
    assert info["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert (info["per_device_batch"], info["micro_batches"], info["per_device_micro_batch"]) == (
        8, 2, 4,
    )  # fmt: skip


def test_compile_on_8_simulated_devices(capsys):
    """--compile: the real sCD step (exact mixture teacher) compiled for a 2 x 4 mesh of the 8
    simulated CPU devices; the donated state XLA aliases is the state the rules predict."""
    argv = ["info", "--config", "toy_gmm:smoke,objective=scd", "--devices", "8",
            "--mesh", "data=2,fsdp=4", "--compile", "--json"]  # fmt: skip
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    info = json.loads(out)
    c = info["compiled"]
    assert (c["platform"], c["devices"]) == ("cpu", 8)
    assert c["compile_seconds"] > 0 and c["temp_bytes"] > 0
    state = info["state_bytes_per_device"]
    assert c["alias_bytes"] == state  # every state buffer is donated and reused
    assert state < c["argument_bytes"] < state + 1024  # + this device's batch rows
    assert c["total_bytes"] == (
        c["argument_bytes"] + c["output_bytes"] - c["alias_bytes"] + c["temp_bytes"]
    )
    table = format_info(info)  # says what the numbers are
    assert "XLA:CPU buffer assignment on 8 simulated CPU devices" in table
    assert "approximation" in table and "compiled in" in table


def test_train_step_from_config_refuses_what_training_refuses():
    config = build.with_overrides(defaults.load_config("mnist:smoke"), micro_batches=3)
    nd = aot.build_network(config.model)
    with pytest.raises(ValueError, match=r"not divisible by train\.micro_batches 3"):
        build.train_step_from_config(config, nd)
    with pytest.raises(ValueError, match="sCD needs a teacher"):
        build.train_step_from_config(defaults.load_config("mnist:smoke,objective=scd"), nd)


@pytest.mark.parametrize(
    ("name", "topology", "chips"),
    [("v5p-64", "v5:2x4x4", 32), ("v5p-8", "v5:2x2x1", 4), ("v4-128", "v4:4x4x4", 64),
     ("v6e-64", "v6e:8x8", 64), ("v6e-8", "v6e:2x4", 8), ("v5e-16", "v5e:4x4", 16),
     ("v5:4x4x12", "v5:4x4x12", 192), ("V6E-256", "v6e:16x16", 256)],
)  # fmt: skip
def test_tpu_topology_names(name, topology, chips):
    desc = aot.parse_tpu_topology(name)
    assert (desc["topology"], desc["chips"]) == (topology, chips)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="libtpu installed")
def test_topology_without_libtpu_says_how_to_get_it(capsys):
    rc, _, err = run_cli(capsys, "info", "--config", "toy_gmm:smoke", "--topology", "v5p-8")
    assert rc == 2 and "compiles with libtpu, which is not installed" in err
    assert "pip install 'jax[tpu]==" in err and len(err.strip().splitlines()) == 1


NO_LIBTPU = importlib.util.find_spec("libtpu") is None


@pytest.mark.skipif(NO_LIBTPU, reason="needs libtpu (not installed)")
def test_topology_compiles_the_scd_step_for_tpu_chips():
    """With libtpu installed, ``--topology`` compiles the real sCD step for a v5p slice on this
    CPU-only machine (a fresh process: the TPU client must not see this test's CPU flags)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    argv = ["info", "--config", "toy_gmm:smoke,objective=scd", "--topology", "v5p-8",
            "--mesh", "data=2,fsdp=2", "--json"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "scm_jax", *argv], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    report = json.loads(out)
    compiled = report["compiled"]
    where = (compiled["platform"], compiled["topology"], compiled["devices"])
    assert where == ("tpu", "v5:2x2x1", 4)
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert compiled["argument_bytes"] >= report["state_bytes_per_device"] > 0
    assert 0 < compiled["total_bytes"] < compiled["hbm_bytes"]
