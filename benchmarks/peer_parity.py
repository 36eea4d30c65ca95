"""float32 parity of the JAX and PyTorch sCD steps (``benchmarks/peer_torch.py`` checks it before
it times them): the same function, the same loss, the same gradient.

For one config and one set of parameters (``host``: numpy trees), both frameworks compute at
full float32 precision (``jax.default_matmul_precision('highest')``; PyTorch without TF32) the
student's forward and the sCD loss and its gradient (``scm_jax.losses.scd_loss`` and
``scm_jax.torch.scd.scd_loss``) for the same x0, z, t, labels, guidance scales and step (r
strictly between 0 and 1, so the warm-up term counts). Errors: max |F_jax - F_torch| /
max |F_jax|, the loss's relative error, and the relative L2 error of the whole gradient (every
network and weighting-head tensor, by its state-dict name).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from scm_jax import bench
from scm_jax.losses import scd_loss
from scm_jax.networks import build_network
from scm_jax.run.state_dict import to_state_dict
from scm_jax.train.build import teacher_model_config

# Beyond these the two steps do not compute the same thing, and peer_torch.py does not time them.
TOLERANCE = {"forward": 1e-3, "loss": 1e-3, "grad": 1e-2}


def inputs(nd: Any, batch: int, seed: int = 0) -> dict[str, Any]:
    """x0, z ``(B, R, R, C)`` (std 0.5), t spread over (0, pi/2), labels, guidance (or None)."""
    rng = np.random.default_rng(seed)
    shape = (batch, *nd.sample_shape)
    return {
        "x0": (0.5 * rng.standard_normal(shape)).astype(np.float32),
        "z": (0.5 * rng.standard_normal(shape)).astype(np.float32),
        "t": np.linspace(0.05, 1.5, batch).astype(np.float32),
        "labels": (np.arange(batch) * 7 % max(nd.num_classes, 1)).astype(np.int32),
        "guidance": np.linspace(1.0, 2.0, batch).astype(np.float32) if nd.guidance_input else None,
    }


def jax_side(cfg32: Any, host: dict[str, Any], x: dict[str, Any], step: int) -> tuple:
    """``(F, loss, {state-dict name: gradient})`` of JAX in float32 (highest precision)."""
    nd, t_nd = build_network(cfg32.model), build_network(teacher_model_config(cfg32.model))
    sigma_d, lo = float(cfg32.trigflow.sigma_d), cfg32.loss
    guidance = x["guidance"]
    labels = x["labels"] if nd.num_classes else None

    def loss(p, teacher):  # parameters are arguments, not constants of the program
        return scd_loss(
            nd.apply_fn, nd.weight_fn if lo.adaptive_weighting else None, p, t_nd.apply_fn,
            teacher, x["x0"], x["z"], x["t"], sigma_d=sigma_d, step=step, labels=labels,
            guidance=guidance, warmup_steps=lo.tangent_warmup_steps, warmup_form=lo.warmup_form,
            tangent_norm=lo.tangent_norm, tangent_c=lo.tangent_c,
            mask_nonfinite=lo.mask_nonfinite,
        )[0]  # fmt: skip

    def both(p, teacher):  # one program: F, then the loss and its gradient
        F = nd.apply_fn(p["net"], x["x0"] / sigma_d, x["t"], labels, guidance)
        return F, *jax.value_and_grad(loss)(p, teacher)

    params = {"net": host["net"], "weight": host["weight"]}
    with jax.default_matmul_precision("highest"):
        F, value, grads = jax.jit(both)(params, host["teacher"])
    named = {f"net.{k}": v for k, v in to_state_dict(grads["net"]).items()}
    named.update({f"weight.{k}": v for k, v in to_state_dict(grads["weight"]).items()})
    return np.asarray(F), float(value), named


def torch_side(cfg32: Any, mods: dict[str, Any], x: dict[str, Any], r: float, device: Any):
    """``(F, loss, {state-dict name: gradient})`` of PyTorch in float32 (no TF32); F NHWC."""
    import torch

    from scm_jax.torch import scd as tscd

    sigma_d = float(cfg32.trigflow.sigma_d)
    net, head, teacher = mods["net"], mods["head"], mods["teacher"]
    if not cfg32.loss.adaptive_weighting:
        head = None

    def dev(a: np.ndarray | None, image: bool = False) -> Any:
        if a is None:
            return None
        a = np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if image else a
        return torch.from_numpy(a.astype(np.int64) if a.dtype == np.int32 else a).to(device)

    labels = dev(x["labels"]) if net.num_classes else None
    params = [*net.parameters(), *([] if head is None else head.parameters())]
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            F = net(dev(x["x0"], True) / sigma_d, dev(x["t"]), labels, dev(x["guidance"]))
        for p in params:
            p.grad = None
        loss, _ = tscd.scd_loss(
            net, head, teacher, dev(x["x0"], True), dev(x["z"], True), dev(x["t"]),
            torch.tensor(r, device=device), sigma_d=sigma_d, labels=labels,
            guidance=dev(x["guidance"]), **tscd.loss_options(cfg32),
        )  # fmt: skip
        loss.backward()
        named = {f"net.{k}": p.grad for k, p in net.named_parameters()}
        if head is not None:
            named.update({f"weight.{k}": p.grad for k, p in head.named_parameters()})
        named = {k: v.detach().cpu().numpy() for k, v in named.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for p in params:
            p.grad = None
    return F.permute(0, 2, 3, 1).cpu().numpy(), float(loss.detach()), named


def check_parity(
    size: str, objective: str, host: dict[str, Any], mods: dict[str, Any], device: Any,
    batch: int = 4,
) -> dict[str, Any]:  # fmt: skip
    """The module docstring's check for ``bench.suite_config(size, objective)`` in float32.

    Args:
      host: numpy parameter trees ``net``, ``weight`` (the head) and ``teacher``, which
        ``mods`` (``net``, ``head``, ``teacher``: ``scm_jax.torch`` modules) hold too.
      device: the PyTorch device of ``mods``.
    Returns:
      ``check_forward_err``, ``check_loss_err``, ``check_grad_err``, both losses, the number
      of gradient tensors compared, and ``check_ok`` (every error within :data:`TOLERANCE`).
    Raises:
      ValueError: the two frameworks' gradients do not name the same tensors.
    """
    cfg32 = bench.suite_config(size, objective, dtype="float32", dropout=0.0)
    H = int(cfg32.loss.tangent_warmup_steps)
    step = max(H // 2, 1)  # 0 < r < 1: the warm-up term is checked
    r = min(1.0, step / H) if H > 0 else 1.0
    x = inputs(build_network(cfg32.model), batch)
    F_j, loss_j, g_j = jax_side(cfg32, host, x, step)
    F_t, loss_t, g_t = torch_side(cfg32, mods, x, r, device)
    if not set(g_t) <= set(g_j):
        raise ValueError(f"gradients of PyTorch tensors JAX lacks: {sorted(set(g_t) - set(g_j))}")
    diff = sum(float(((g_j[k] - g_t[k]) ** 2).sum()) for k in g_t)
    norm = sum(float((g_j[k] ** 2).sum()) for k in g_t)
    errors = {
        "forward": float(np.abs(F_t - F_j).max() / np.abs(F_j).max()),
        "loss": abs(loss_t - loss_j) / max(abs(loss_j), 1e-12),
        "grad": (diff / max(norm, 1e-30)) ** 0.5,
    }
    return {
        "check_batch": batch, "check_loss_jax": loss_j, "check_loss_torch": loss_t,
        "check_grad_tensors": len(g_t),
        "check_ok": all(errors[k] <= TOLERANCE[k] for k in errors),
        **{f"check_{k}_err": v for k, v in errors.items()},
    }  # fmt: skip
