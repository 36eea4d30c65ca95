"""Every config loads for each objective and size, builds its network, rejects bad arguments."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from scm_jax import ema
from scm_jax.config import defaults, validate
from scm_jax.networks import build_network
from scm_jax.optim import make_optimizer

SIZES = {
    "toy_gmm": [None],
    "mnist": ["xs", "s", "m"],
    "cifar10": ["xs", "s", "m"],
    "imagenet64": ["xs", "s", "m", "l", "xl", "xxl"],
    "imagenet512": ["xs", "s", "m", "l", "xl", "xxl"],
}


@pytest.mark.parametrize("name", sorted(SIZES))
@pytest.mark.parametrize("objective", defaults.OBJECTIVES)
def test_every_config_builds_its_network(name, objective):
    for size in SIZES[name]:
        arg = f"objective={objective}" + (f",size={size}" if size else "")
        cfg = defaults.load_config(f"configs/{name}.py:{arg}")
        assert cfg.objective == objective
        sections = {"dataset", "model", "trigflow", "loss", "teacher", "optim", "ema"}
        assert set(cfg.keys()) >= sections
        nd = build_network(cfg.model)  # validates the hyperparameters
        assert nd.sample_shape == tuple(cfg.dataset.shape)
        make_optimizer(**cfg.optim, batch_size=cfg.batch_size)  # the optim section is complete
        for sigma_rel in cfg.ema.power_std:
            assert ema.power_exponent(sigma_rel) > 0
        assert cfg.trigflow.sigma_d == cfg.model.sigma_d == 0.5


@pytest.mark.parametrize("name", sorted(SIZES))
def test_smoke_configs_run_a_forward(name):
    cfg = defaults.load_config(f"{name}:smoke")
    nd = build_network(cfg.model)
    params = nd.init(jax.random.key(0))
    ex = nd.example_inputs(2)
    x = jnp.ones(ex["x"].shape)
    labels = jnp.zeros((2,), jnp.int32) if nd.num_classes else None
    guidance = jnp.ones((2,)) if nd.guidance_input else None
    F = jax.jit(nd.net.apply)({"params": params["net"]}, x, jnp.full((2,), 0.5), labels, guidance)
    assert F.shape == x.shape and bool(jnp.all(jnp.isfinite(F)))
    assert cfg.batch_size == 8


def test_paper_hyperparameters_spot_checks():
    c = defaults.load_config("imagenet512:size=xxl,objective=scd")
    assert (c.model.model_channels, c.model.guidance_input, c.model.dropout) == (448, True, 0.1)
    assert (c.trigflow.P_mean, c.trigflow.P_std, c.loss.tangent_c) == (-0.8, 1.6, 0.1)
    assert (c.teacher.guidance_min, c.teacher.guidance_max) == (1.0, 2.0)
    assert c.optim.lr == pytest.approx(6.5e-5) and c.optim.eps == 1e-11
    t = defaults.load_config("imagenet512:size=m,objective=diffusion")
    assert (t.model.label_dropout, t.trigflow.P_mean, t.trigflow.P_std) == (0.1, -0.4, 1.0)
    s = defaults.load_config("imagenet64:size=xl,objective=sct")
    assert (s.model.dropout, s.model.dropout_max_res, s.optim.lr) == (0.45, 16, pytest.approx(7e-5))
    cif = defaults.load_config("cifar10:objective=sct")
    got = (cif.optim.name, cif.optim.lr, cif.batch_size, cif.model.num_classes)
    assert got == ("radam", 1e-4, 512, 0)


def test_dmd_and_rcm_hyperparameters_spot_checks():
    """DMD2's and rCM's settings (reference §7, §8) on top of each dataset's sCD settings."""
    c = defaults.load_config("imagenet512:size=xxl,objective=rcm")
    assert (c.dmd.weight, c.dmd.critic_updates, c.dmd.generator_steps) == (0.01, 4, 4)
    assert (c.loss.warmup_form, c.loss.adaptive_weighting, c.dmd.rollout) == ("rcm", False,
                                                                              "random")  # fmt: skip
    assert c.dmd.start_step == c.loss.tangent_warmup_steps and c.model.guidance_input
    assert c.dmd.critic_lr == pytest.approx(0.2 * c.optim.lr) and c.total_kimg == 40_960
    assert (c.dmd.critic_P_mean, c.dmd.critic_P_std) == (c.trigflow.P_mean, c.trigflow.P_std)
    d = defaults.load_config("imagenet64:size=s,objective=dmd")
    assert (d.dmd.critic_updates, d.dmd.generator_steps, d.dmd.weight) == (5, 1, 1.0)
    assert d.total_kimg == 56_000 and d.dmd.critic_lr == d.optim.lr and d.model.dropout == 0.0
    assert (d.loss.warmup_form, d.loss.adaptive_weighting) == ("scm", True)
    assert defaults.load_config("mnist:objective=dmd").optim.lr == 1e-3
    assert defaults.load_config("toy_gmm:objective=rcm").teacher.kind == "exact_gmm"


def test_mnist_default_distils_the_shipped_teacher():
    """Issue 21: ``make run`` is sCD from the teacher in configs/teachers/mnist_s (an export
    folder of the same architecture and data scale); sCT at size s starts from it; other sizes
    and smoke runs have no shipped teacher."""
    from scm_jax.run.exports import is_export

    cfg = defaults.load_config("mnist")
    shipped = Path(cfg.teacher.workdir)
    assert cfg.objective == "scd" and cfg.model.size == "s" and is_export(shipped)
    assert shipped == Path(__file__).resolve().parent.parent / "configs" / "teachers" / "mnist_s"
    validate.validate(cfg, check_paths=True)  # the teacher's architecture and scale match
    sct = defaults.load_config("mnist:objective=sct")
    assert sct.init_from == str(shipped) and sct.teacher.workdir == "" and sct.optim.lr == 1e-3
    for spec in ("mnist:size=xs", "mnist:smoke,objective=scd", "mnist:objective=diffusion"):
        c = defaults.load_config(spec)
        assert c.teacher.workdir == c.init_from == "", spec
    assert defaults.load_config("mnist:smoke").objective == "sct"
    assert defaults.load_config("mnist:size=xs,objective=sct").optim.lr == 1e-2


def test_shared_sigma_d_and_locked_config():
    cfg = defaults.load_config("mnist")
    cfg.model.sigma_d = 0.7
    assert cfg.trigflow.sigma_d == 0.7
    with pytest.raises(AttributeError):
        cfg.model.not_a_field = 1


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("imagenet512:size=xxxl", "unknown size 'xxxl'; choose one of xs, s, m, l, xl, xxl"),
        ("mnist:objective=gan", "unknown objective 'gan'"),
        ("mnist:resolution=32", "unknown config argument 'resolution'"),
        ("mnist:smoke=maybe", "smoke='maybe' is not a boolean"),
        ("toy_gmm:size=s", "unknown config argument 'size'"),
    ],
)
def test_bad_config_arguments_name_the_value(spec, match):
    with pytest.raises(ValueError, match=match):
        defaults.load_config(spec)


def test_missing_config_file_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="configs: cifar10, imagenet512"):
        defaults.load_config("configs/imagenet1k.py")
