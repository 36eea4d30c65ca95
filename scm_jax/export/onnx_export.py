"""ONNX of F_theta and of the 1- and 2-step samplers, through the PyTorch module.

Why through PyTorch: the JAX-native route (jax2onnx) pins an older orbax-checkpoint than scm-jax
needs and could not export a dynamic batch in our trials (docs/export.md#onnx), whereas
``scm_jax.torch`` reproduces F_theta within float rounding and ``torch.onnx.export`` (the dynamo
exporter, onnxscript) handles a dynamic batch. Every file is checked with ONNX Runtime on a batch
other than the traced one.

Files (NCHW, like the PyTorch module): ``network.onnx`` with inputs ``x_scaled`` ``(B, C, H, W)``
(or ``(B, D)``), ``t`` ``(B,)``, then ``labels`` int64 ``(B,)`` (-1 = null) for class-conditional
models and ``guidance`` ``(B,)`` for guidance-input models, output ``F``; ``sample_{n}step.onnx``
with inputs ``noise`` ``(n, B, C, H, W)`` standard normal (then labels / guidance), output ``x0``.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax import objectives
from scm_jax.files import staged_files

INSTALL_HINT = "pip install 'scm-jax[torch,export]'"
OPSET = 18


def _require() -> tuple[Any, Any]:
    try:
        import onnxruntime
        import torch
    except ImportError as e:
        raise ImportError(
            f"the ONNX export needs torch, onnx, onnxscript and onnxruntime: {INSTALL_HINT} ({e})"
        ) from None
    return torch, onnxruntime


def _cond_inputs(net: Any, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if net.num_classes:
        out["labels"] = rng.integers(-1, net.num_classes, batch).astype(np.int64)
    if net.guidance_input:
        out["guidance"] = (1 + rng.random(batch)).astype(np.float32)
    return out


def export_onnx(
    export_dir: str | Path, out_dir: str | Path, *, samplers: tuple[int, ...] = (1, 2)
) -> dict[str, float]:
    """Write ``network.onnx`` (and ``sample_{n}step.onnx`` for ``n`` in ``samplers``) for the
    export in ``export_dir`` and check each with ONNX Runtime against the PyTorch module.

    Returns:
      ``{file name: max |ONNX Runtime - PyTorch|}`` on a random batch of 3 (traced with 2).
    Raises:
      ImportError: torch / onnxruntime missing (the message says what to install).
      ValueError: ONNX Runtime disagrees with PyTorch by more than 1e-4 (relative to the
        output's scale).
    """
    torch, ort = _require()
    from scm_jax.torch import ConsistencySampler, consistency_times, load_network

    net = load_network(export_dir)
    out_dir = Path(out_dir)
    names = ["labels"] * bool(net.num_classes) + ["guidance"] * bool(net.guidance_input)
    shape = _sample_shape(net.config["model"])

    class Network(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x_scaled, t, *cond):
            return self.net(x_scaled, t, *_named(names, cond))

    class Sampler(torch.nn.Module):
        def __init__(self, steps: int) -> None:
            super().__init__()
            times = consistency_times(steps, net.t_max, net.t_mid)
            self.sampler = ConsistencySampler(net, times, net.sigma_d, net.data_scale)

        def forward(self, noise, *cond):
            return self.sampler(noise, *_named(names, cond))

    rng = np.random.default_rng(0)
    jobs = [
        (
            "network.onnx",
            Network(),
            ["x_scaled", "t"],
            ["F"],
            lambda b: {
                "x_scaled": rng.standard_normal((b, *shape)).astype(np.float32),
                "t": (0.1 + 1.4 * rng.random(b)).astype(np.float32),
            },
        )
    ]
    if not objectives.is_diffusion(net.config["objective"]):
        for n in samplers:
            jobs.append(
                (
                    f"sample_{n}step.onnx",
                    Sampler(n),
                    ["noise"],
                    ["x0"],
                    lambda b, n=n: {
                        "noise": rng.standard_normal((n, b, *shape)).astype(np.float32)
                    },
                )
            )
    errors = {}
    for fname, module, inputs, outputs, make in jobs:
        module.eval()
        example = {**make(2), **_cond_inputs(net, 2, rng)}
        batch = torch.export.Dim("batch", min=1)
        main = [k for k in example if k not in names]  # *cond is one nested entry
        dyn = (*({1 if k == "noise" else 0: batch} for k in main), tuple({0: batch} for _ in names))
        args = tuple(torch.from_numpy(v) for v in example.values())
        # Written (with its .data) in a staging folder beside the destination and checked
        # there; renamed into place only if it passes.
        with staged_files(out_dir, last=(fname,)) as stage:
            tmp = stage / fname
            with _quiet_exporter():
                torch.onnx.export(
                    module,
                    args,
                    str(tmp),
                    dynamo=True,
                    opset_version=OPSET,
                    input_names=[*inputs, *names],
                    output_names=outputs,
                    dynamic_shapes=dyn,
                    verbose=False,
                )
            check = {**make(3), **_cond_inputs(net, 3, rng)}
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = session.run(None, check)[0]
            with torch.no_grad():
                want = module(*(torch.from_numpy(v) for v in check.values())).numpy()
            err = float(np.abs(got - want).max())
            if not err <= 1e-4 * max(1.0, float(np.abs(want).max())):
                raise ValueError(f"{fname}: ONNX Runtime differs from PyTorch by {err:.3g}")
        errors[fname] = err
    return errors


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes that concern nothing here (torchvision ops it skips, the
    renaming of the batch axis); errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _named(names: list[str], cond: tuple[Any, ...]) -> tuple[Any, Any]:
    d = dict(zip(names, cond, strict=True))
    return d.get("labels"), d.get("guidance")


def _sample_shape(model: dict[str, Any]) -> tuple[int, ...]:
    """One sample's PyTorch shape: ``(C, R, R)`` or ``(D,)``."""
    if model["arch"] == "edm2_unet":
        return (model["img_channels"], model["img_resolution"], model["img_resolution"])
    return (model.get("data_dim", 2),)
