"""DMD and rCM in the training system: end-to-end runs, resume with the critic, the sampler of a
DMD run, the critic in checkpoints and in the sharded step, AOT compilation, `scm-jax info`."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import quiet, smoke_config, tree_bytes
from jax.sharding import NamedSharding, PartitionSpec

import scm_jax
from scm_jax import cli
from scm_jax.config import defaults
from scm_jax.networks import build_network
from scm_jax.optim import make_optimizer
from scm_jax.run.checkpoint import Checkpointer
from scm_jax.run.state import state_shardings, with_shardings
from scm_jax.sharding import activation_rules, batch_sharding, make_mesh
from scm_jax.train.dmd_config import validate_dmd_config
from scm_jax.train.loop import train
from scm_jax.train.step_dmd import DMDOptions, init_dmd_state, make_dmd_train_step
from scm_jax.train.writers import read_metrics

P = PartitionSpec


@pytest.mark.parametrize("objective", ["dmd", "rcm"])
def test_toy_run_trains_resumes_and_samples(objective, tmp_path):
    """2 steps, then 2 more resumed from the checkpoint (critic included); the sampler reads it."""
    spec = f"toy_gmm:smoke,objective={objective}"
    out = train(smoke_config(spec), tmp_path / "run", log=quiet)
    assert out["step"] == 2 and out["interrupted"] is None
    rows = read_metrics(tmp_path / "run")
    keys = {"loss", "dmd_loss", "critic_loss", "critic_grad_norm", "critic_skipped", "grad_norm"}
    assert all(keys <= set(r) and np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0
               for r in rows)  # fmt: skip
    assert ("tangent_norm" in rows[0]) == (objective == "rcm")
    lines: list[str] = []
    out = train(smoke_config(spec, steps=4), tmp_path / "run", log=lines.append)
    assert out["step"] == 4 and any(ln.startswith("resumed") for ln in lines)
    ckpt = Checkpointer(tmp_path / "run", read_only=True)
    meta = ckpt.read_meta()
    ckpt.close()
    assert meta["objective"] == objective and meta["step"] == 4

    sampler = scm_jax.load_sampler(tmp_path / "run")
    x = sampler.sample(0, 5, steps=1)
    assert x.shape == (5, 2) and np.all(np.isfinite(x))
    np.testing.assert_array_equal(x, sampler.sample(0, 5, steps=1))
    assert sampler.nfe(2) == 2 and sampler.sample(1, 3, steps=4).shape == (3, 2)


def test_state_with_critic_round_trips_sharded(tmp_path):
    """Saved FSDP-sharded on 8 devices, restored on 4: the critic bit-exact, sharded like the
    student (same specs for the same paths)."""
    nd = tiny_mlp()
    tx, _ = make_optimizer("adam", 1e-3, batch_size=8)
    state = init_dmd_state(nd, tx, tx, jax.random.key(0), power_std=(0.1,), halflife_kimg=0.0)
    state = state.replace(critic=jax.tree.map(lambda a: a + 0.25, state.critic))
    mesh8 = make_mesh(1, 8)
    shardings = state_shardings(state, mesh8)
    student = jax.tree.leaves(shardings.params, is_leaf=lambda s: isinstance(s, NamedSharding))
    critic = jax.tree.leaves(shardings.critic["params"],
                             is_leaf=lambda s: isinstance(s, NamedSharding))  # fmt: skip
    assert [s.spec for s in student] == [s.spec for s in critic]
    assert any("fsdp" in str(s.spec) for s in critic)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(jax.device_put(state, shardings), {"step": 0, "batch_size": 8})
    ckpt.close()
    mesh4 = make_mesh(1, 4, devices=jax.devices()[:4])
    abstract = jax.eval_shape(lambda: state)
    ckpt = Checkpointer(tmp_path, read_only=True)
    restored = ckpt.restore(with_shardings(abstract, state_shardings(abstract, mesh4)))
    ckpt.close()
    assert tree_bytes(restored.critic) == tree_bytes(state.critic)
    assert tree_bytes(restored) == tree_bytes(state)


def tiny_mlp(**over):
    cfg = {"arch": "mlp", "data_dim": 4, "hidden": 16, "depth": 1, "emb_channels": 16,
           "weight_channels": 16, "num_classes": 5, "sigma_d": 0.5, **over}  # fmt: skip
    return build_network(cfg)


def test_sharded_dmd_step_equals_one_device():
    """rCM with a CFG teacher at a fixed scale, dropout (per-sample keys) and labels: the step on
    data=2 x fsdp=2 x tensor=2 equals one device's, for the student and the critic."""
    nd = tiny_mlp(dropout=0.1)
    teacher = tiny_mlp()
    t_params = teacher.init(jax.random.key(5))["net"]
    tx, schedule = make_optimizer("adam", 1e-2, batch_size=8)
    options = DMDOptions(critic_updates=2, generator_steps=2, rollout="random", weight=0.5)
    step = make_dmd_train_step(
        nd, tx, schedule, tx, objective="rcm", options=options, sigma_d=0.5, P_mean=-1.0,
        P_std=1.6, batch_size=8, power_std=(0.1,), halflife_kimg=0.0,
        teacher_apply_fn=teacher.apply_fn, guidance_range=(2.0, 2.0), adaptive_weighting=False,
        loss_options={"warmup_steps": 0, "warmup_form": "rcm"},
    )  # fmt: skip
    state = init_dmd_state(nd, tx, tx, jax.random.key(0), power_std=(0.1,), halflife_kimg=0.0,
                           init_net=t_params)  # fmt: skip
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.standard_normal((8, 4)) * 0.5, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
    ref, ref_values = jax.jit(step)(jax.device_put(state, jax.devices()[0]), x0, labels, t_params)
    mesh = make_mesh(2, 2, 2)
    shardings = state_shardings(state, mesh).replace(
        step=NamedSharding(mesh, P()), rng=NamedSharding(mesh, P())
    )
    xs = jax.device_put((x0, labels), batch_sharding(mesh))
    with activation_rules(mesh):
        new, values = jax.jit(step, out_shardings=(shardings, None))(
            jax.device_put(state, shardings), *xs, t_params
        )
    for name in ("loss", "dmd_loss", "critic_loss"):
        np.testing.assert_allclose(values[name], ref_values[name], rtol=2e-4, atol=1e-7)
    for tree in ("params", "critic"):
        for a, b in zip(jax.tree.leaves(getattr(new, tree)), jax.tree.leaves(getattr(ref, tree)),
                        strict=True):  # fmt: skip
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
    assert float(values["nonfinite_steps"]) == 0 and float(values["critic_skipped"]) == 0


def test_aot_compile_and_info_of_the_new_objectives(capsys):
    """The step compiles ahead of time on 2 devices; `scm-jax info` counts the critic and the
    DMD / rCM step FLOPs from the network's."""
    from scm_jax.info import model_info
    from scm_jax.train import aot

    cfg = defaults.load_config("toy_gmm:smoke,objective=rcm")
    out = aot.compile_train_step(cfg, make_mesh(2, 1, devices=jax.devices()[:2]))
    assert out["devices"] == 2 and out["total_bytes"] > 0
    cfg = defaults.load_config("mnist:smoke,objective=dmd")
    info = model_info(cfg, devices=2)
    b = info["state_bytes_breakdown"]
    assert b["critic"] == b["params"] + b["optimizer"] and b["teacher"] > 0
    F, G = info["forward_gflops"], info["fwd_bwd_gflops"]
    T = info["teacher_forward_gflops"]
    k = cfg.dmd.critic_updates  # one-step DMD: k (F + G) + G + F + T
    assert info["train_step_gflops"]["dmd"] == pytest.approx(k * (F + G) + G + F + T, rel=1e-6)
    assert info["train_step_objective"] == "dmd"
    assert cli.main(["info", "--config", "imagenet512:smoke,objective=rcm"]) == 0
    assert "critic" in capsys.readouterr().out


def test_bad_dmd_settings_are_refused(tmp_path, capsys):
    """One clear line from the CLI, nothing written; each check of ``validate_dmd_config``."""
    args = ["--config", "mnist:smoke,objective=dmd", "--config.dmd.rollout=backward"]
    code = cli.main(["train", *args, "--workdir", str(tmp_path / "new")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "dmd.rollout='backward': must be one of 'fixed', 'random'" in err
    assert not (tmp_path / "new").exists()
    validate_dmd_config(defaults.load_config("mnist:objective=sct"))  # not checked
    cases = [({"dmd.rollout": "backward"}, "dmd.rollout='backward': must be one of"),
             ({"dmd.critic_updates": 0}, "dmd.critic_updates=0: must be >= 1"),
             ({"train.micro_batches": 2}, "gradient accumulation is not implemented"),
             ({"dmd.regression_batch": 64}, "exceeds batch_size"),
             ({"teacher.guidance_max": 2.0}, "needs model.guidance_input=True")]  # fmt: skip
    for over, message in cases:
        cfg = smoke_config("mnist:smoke,objective=dmd", **over)
        with pytest.raises(ValueError, match=message):
            validate_dmd_config(cfg)


@pytest.mark.slow
def test_mnist_dmd_from_a_teacher_and_its_sampler(tmp_path):
    """`configs/mnist.py:objective=dmd` trains from a teacher run; load_sampler and `scm-jax
    sample` give 1- and 2-step digits (a DMD student samples like a consistency model)."""
    small = {"train.sample_grid": 4, "train.teacher_sample_steps": 2}  # cheap preview grids
    teacher = tmp_path / "teacher"
    train(smoke_config("mnist:smoke,objective=diffusion", **small), teacher, log=quiet)
    cfg = smoke_config("mnist:smoke,objective=dmd", **small, **{"teacher.workdir": str(teacher),
                       "dmd.critic_updates": 2})  # fmt: skip
    lines: list[str] = []
    out = train(cfg, tmp_path / "dmd", log=lines.append)
    assert out["step"] == 2 and any("student initialised from the teacher" in ln for ln in lines)
    assert {Path(p).name.split("_", 1)[1] for p in out["samples"]} == {"1step.png", "2step.png"}
    sampler = scm_jax.load_sampler(tmp_path / "dmd")
    for steps in (1, 2):
        x = sampler.sample(0, 3, steps=steps, labels=[0, 1, 2])
        assert x.shape == (3, 28, 28, 1) and -1 <= x.min() and x.max() <= 1
    png = tmp_path / "s.png"
    assert cli.main(["sample", "--workdir", str(tmp_path / "dmd"), "--steps", "1", "--num", "4",
                     "--out", str(png)]) == 0  # fmt: skip
    assert png.stat().st_size > 0
