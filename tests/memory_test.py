"""Memory levers (docs/training.md#memory-levers): activation rematerialisation (``model.remat``)
and gradient accumulation over micro-batches (``train.micro_batches``) change memory, never the
numbers: remat 'block' / 'full' give the loss and gradients of 'none', and k micro-batches give
the parameters, EMAs and metrics of one big-batch step (float32 tolerance), on 8 CPU devices."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import SIGMA_D, randomize, tiny_unet

from scm_jax import cli
from scm_jax.losses import proposal_time_edges, scd_loss, sct_loss
from scm_jax.networks import build_network
from scm_jax.run.state import create_sharded_state, init_state
from scm_jax.sharding import batch_sharding, make_mesh
from scm_jax.train.step import make_train_step

P_MEAN, P_STD = -1.0, 1.4
LR = 0.05
EMA = {"power_std": (0.1,), "halflife_kimg": 0.0}


def _batch(n: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x0 = jnp.asarray(rng.normal(0, SIGMA_D, (n, 8, 8, 3)), jnp.float32)
    return x0, jnp.asarray(rng.integers(0, 5, n), jnp.int32)


def _assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
    leaves = zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True)
    for (path, x), y in leaves:
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


@pytest.mark.parametrize("objective", ["sct", pytest.param("scd", marks=pytest.mark.slow)])
def test_remat_gives_the_same_loss_and_gradients(objective):
    """'block' and 'full' (with dropout and label dropout on) equal 'none' in loss and gradient."""
    opts = {"dropout": 0.3, "label_dropout": 0.2, "dropout_max_res": 8}
    nets = {r: tiny_unet(remat=r, **opts) for r in ("none", "block", "full")}
    params = randomize(nets["none"].init(jax.random.key(0)), 1)
    for nd in nets.values():  # the same parameter tree whatever the policy
        assert jax.tree.structure(nd.abstract_params()) == jax.tree.structure(params)
    teacher = tiny_unet(guidance_input=False)
    t_params = randomize(teacher.init(jax.random.key(2)), 3)["net"]
    x0, labels = _batch(4)
    z = jnp.asarray(np.random.default_rng(4).normal(0, SIGMA_D, x0.shape), jnp.float32)
    t = jnp.array([0.05, 0.4, 0.9, 1.5], jnp.float32)
    guidance = jnp.array([1.0, 1.3, 1.7, 2.0], jnp.float32)
    kw = {"sigma_d": SIGMA_D, "step": 3, "labels": labels, "key": jax.random.key(5),
          "warmup_steps": 10}  # fmt: skip

    def loss(nd, p):
        if objective == "sct":
            return sct_loss(nd.apply_fn, nd.weight_fn, p, x0, z, t, guidance=guidance, **kw)[0]
        return scd_loss(nd.apply_fn, nd.weight_fn, p, teacher.apply_fn, t_params, x0, z, t,
                        guidance=guidance, **kw)[0]  # fmt: skip

    out = {r: jax.jit(jax.value_and_grad(lambda p, nd=nd: loss(nd, p)))(params)
           for r, nd in nets.items()}  # fmt: skip
    assert np.isfinite(float(out["none"][0]))
    for r in ("block", "full"):
        np.testing.assert_allclose(float(out[r][0]), float(out["none"][0]), rtol=1e-6)
        _assert_trees_close(out[r][1], out["none"][1], rtol=1e-5, atol=1e-7)


def test_remat_full_on_the_mlp_and_clear_errors():
    """'full' works for the MLP too (same gradient); 'block' there and bad values are refused."""
    mlp = {"arch": "mlp", "data_dim": 2, "hidden": 16, "depth": 2, "emb_channels": 8}
    nets = {r: build_network({**mlp, "remat": r}) for r in ("none", "full")}
    params = randomize(nets["none"].init(jax.random.key(0)), 0)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)), jnp.float32)
    t = jnp.linspace(0.1, 1.5, 6)

    def grad(nd):
        return jax.grad(lambda p: jnp.sum(nd.apply_fn(p["net"], x, t) ** 2))(params)

    _assert_trees_close(grad(nets["full"]), grad(nets["none"]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"model.remat='block' .* needs model.arch 'edm2_unet'"):
        build_network({**mlp, "remat": "block"})
    with pytest.raises(ValueError, match=r"unknown model.remat 'layer'; choose one of none"):
        tiny_unet(remat="layer")
    with pytest.raises(ValueError, match=r"set model\.remat"):
        tiny_unet(remat_blocks=True)


def _steps(objective: str, ks: tuple[int, ...], *, time_edges, nd, teacher=None):
    """The jitted step of ``objective`` for each micro-batch count, on a data=4 x fsdp=2 mesh."""
    mesh = make_mesh(data=4, fsdp=2)
    tx = optax.sgd(LR)  # updates proportional to gradients: parameters compare gradients
    common = dict(
        objective=objective, sigma_d=SIGMA_D, P_mean=P_MEAN, P_std=P_STD, batch_size=32, **EMA,
        loss_options={"warmup_steps": 10} if objective != "diffusion" else None,
        teacher_apply_fn=None if teacher is None else teacher.apply_fn,
        guidance_range=(1.0, 2.0) if objective == "scd" else (1.0, 1.0), time_edges=time_edges,
        batch_sharding=batch_sharding(mesh),
    )  # fmt: skip
    steps = {k: jax.jit(make_train_step(nd, tx, lambda s: LR, micro_batches=k, **common))
             for k in ks}  # fmt: skip

    def make_state(key, init_net):
        return init_state(nd, tx, key, **EMA, init_net=init_net)

    net = randomize(nd.init(jax.random.key(0)), 7)["net"]
    state, _ = create_sharded_state(make_state, mesh, jax.random.key(1), net)
    x0, labels = _batch(32, 8)
    x0 = jax.device_put(x0, batch_sharding(mesh))
    labels = jax.device_put(labels, batch_sharding(mesh))
    return steps, state, x0, labels


@pytest.mark.parametrize(
    "objective, ks, edges, dropout, remat",
    [("sct", (1, 4), "proposal", 0.3, "none"),
     pytest.param("scd", (1, 4), None, 0.0, "none", marks=pytest.mark.slow),
     pytest.param("diffusion", (1, 2), None, 0.2, "block", marks=pytest.mark.slow)],
)  # fmt: skip
def test_micro_batches_give_the_big_batch_step(objective, ks, edges, dropout, remat):
    """k micro-batches: the same parameters, optimiser state, EMAs and metrics as k = 1.

    Dropout and label dropout are on where ``dropout`` > 0 (their masks are per sample), sCD's
    guidance scales are drawn per sample, ``edges=None`` bins by the whole batch's quartiles, and
    remat composes with all of it.
    """
    nd = tiny_unet(dropout=dropout, label_dropout=dropout / 2, dropout_max_res=8,
                   guidance_input=objective == "scd", remat=remat)  # fmt: skip
    teacher, t_params = None, None
    if objective == "scd":
        teacher = tiny_unet(guidance_input=False)
        t_params = randomize(teacher.init(jax.random.key(2)), 3)["net"]
    time_edges = proposal_time_edges(P_MEAN, P_STD, SIGMA_D, 4) if edges else None
    steps, state, x0, labels = _steps(objective, ks, time_edges=time_edges, nd=nd,
                                      teacher=teacher)  # fmt: skip
    out = {k: step(state, x0, labels, t_params) for k, step in steps.items()}
    ref_state, ref_values = out[1]
    assert float(ref_values["nonfinite_steps"]) == 0 and np.isfinite(float(ref_values["loss"]))
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ref_state.params,
                         state.params)  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 1e-3  # the step did something
    for k in ks[1:]:
        new_state, values = out[k]
        assert sorted(values) == sorted(ref_values)
        _assert_trees_close(values, ref_values, rtol=1e-5, atol=1e-6)
        _assert_trees_close(new_state.params, ref_state.params, rtol=1e-5, atol=1e-6)
        _assert_trees_close(new_state.emas, ref_state.emas, rtol=1e-5, atol=1e-6)
        assert int(new_state.step) == 1


def test_micro_batch_errors_are_clear():
    """Bad micro-batch counts fail in make_train_step, before anything is traced."""
    nd = tiny_unet(guidance_input=False)
    mesh = make_mesh(data=8, fsdp=1)
    kw = dict(objective="sct", sigma_d=SIGMA_D, P_mean=P_MEAN, P_std=P_STD, **EMA)
    tx = optax.sgd(LR)
    with pytest.raises(ValueError, match=r"train.micro_batches must be an integer >= 1, got 0"):
        make_train_step(nd, tx, lambda s: LR, batch_size=16, micro_batches=0, **kw)
    with pytest.raises(ValueError, match=r"by train.micro_batches 4 x 8 batch shards .* = 32"):
        make_train_step(nd, tx, lambda s: LR, batch_size=16, micro_batches=4,
                        batch_sharding=batch_sharding(mesh), **kw)  # fmt: skip
    step = make_train_step(nd, tx, lambda s: LR, batch_size=16, micro_batches=2, **kw)
    state = jax.eval_shape(lambda k: init_state(nd, tx, k, **EMA), jax.random.key(0))
    x0, labels = jax.ShapeDtypeStruct((7, 8, 8, 3), jnp.float32), None
    with pytest.raises(ValueError, match=r"batch_size 7 is not divisible by train.micro_batches 2"):
        jax.eval_shape(step, state, x0, labels, None)


@pytest.mark.parametrize(
    "override, message",
    [("--config.train.micro_batches=3", "not divisible by train.micro_batches=3"),
     ("--config.train.micro_batches=0", "train.micro_batches=0: must be >= 1"),
     ("--config.train.micro_batches=2", "micro-batches"),
     ("--config.model.remat=layers", "model.remat='layers': must be one of 'none', 'block'")],
)  # fmt: skip
def test_train_refuses_bad_levers_with_one_line(override, message, tmp_path, capsys):
    """``scm-jax train`` stops before compiling with one line naming the field (8 devices)."""
    args = ["train", "--config", "mnist:smoke", override, "--workdir", str(tmp_path / "w")]
    code = cli.main(args)  # mnist:smoke has batch_size 8
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_training_loop_runs_with_both_levers(tmp_path):
    """``train()`` with remat='block' and 2 micro-batches on 8 devices: finite metrics."""
    from scm_jax.config import defaults
    from scm_jax.train.loop import train
    from scm_jax.train.writers import read_metrics

    cfg = defaults.load_config("mnist:smoke")
    with cfg.unlocked():
        cfg.batch_size = 16
        cfg.total_kimg = 2 * 16 / 1000
        cfg.train.log_every_kimg = 16 / 1000
        cfg.train.sample_every_kimg = 0.0
        cfg.train.micro_batches = 2
        cfg.model.remat = "block"
    out = train(cfg, tmp_path / "run", log=lambda line: None)
    rows = read_metrics(tmp_path / "run")
    assert out["step"] == 2 and [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["nonfinite_steps"] == 0 for r in rows)


def test_remat_may_change_on_resume():
    """model.remat is a memory lever: not part of a run's identity or its architecture."""
    from scm_jax.run.layout import NON_ARCH_FIELDS, _is_identity

    assert not _is_identity("model.remat") and _is_identity("model.model_channels")
    assert "remat" in NON_ARCH_FIELDS
    nd = tiny_unet(remat="block")
    assert dataclasses.replace(nd, remat="none").abstract_params() == nd.abstract_params()
