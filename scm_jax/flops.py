"""Model FLOPs counted from a function's jaxpr on abstract shapes (no weights materialised).

Convention (``docs/performance.md``; MaxText / PaLM MFU convention): a multiply-add is 2 FLOPs and
only matrix products and convolutions count (``dot_general``, ``conv_general_dilated``);
elementwise work, normalisations and softmax are excluded, as in EDM2's and PyTorch's FLOP
counters. Because the count is read from the traced program, ``jax.jvp`` and ``jax.grad`` are
counted as JAX actually executes them: a JVP with closed-over parameters costs one extra product
per linear layer (symbolic-zero weight tangents), attention two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
from jax import core as jax_core

try:  # jax >= 0.4.36 exposes the jaxpr types under jax.extend
    from jax.extend.core import ClosedJaxpr, Jaxpr
except ImportError:  # pragma: no cover - older jax
    ClosedJaxpr, Jaxpr = jax_core.ClosedJaxpr, jax_core.Jaxpr

__all__ = ["count_flops", "flops_by_dtype", "flops_by_kind", "jaxpr_flops", "jaxpr_flops_split"]


def _dot_general_flops(eqn: Any) -> int:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs.shape) if i not in (*rhs_contract, *rhs_batch)]
    # lhs elements already cover batch x contraction x lhs-free; multiply by rhs-free.
    return 2 * math.prod(lhs.shape) * math.prod(rhs_free)


def _conv_flops(eqn: Any) -> int:
    rhs = eqn.invars[1].aval
    out = eqn.outvars[0].aval
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out_feature, in_feature, *spatial) axis indices
    in_per_group = rhs.shape[rhs_spec[1]]
    window = math.prod(rhs.shape[i] for i in rhs_spec[2:])
    # Each output element is a sum over (in_per_group x window) products.
    return 2 * math.prod(out.shape) * in_per_group * window


def _sub_jaxprs(params: dict) -> list[Any]:
    """The jaxprs nested in an equation's params (jit bodies, custom_jvp calls, scan bodies)."""
    found = []
    for val in params.values():
        for v in val if isinstance(val, (tuple, list)) else (val,):
            if isinstance(v, (ClosedJaxpr, Jaxpr)):
                found.append(v)
    return found


def _by_dtype(eqn: Any) -> str:
    return str(eqn.invars[0].aval.dtype)


def _by_kind(eqn: Any) -> str:
    if eqn.primitive.name == "conv_general_dilated":
        return "conv"
    (_, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    return "batched_matmul" if lhs_batch else "matmul"  # attention's QK^T and PV are batched


def _walk(jaxpr: Any, mult: int, acc: dict[str, int], key: Callable[[Any], str]) -> None:
    """Add ``mult`` x each product's FLOPs to ``acc[key(its equation)]``."""
    if isinstance(jaxpr, ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            flops = _dot_general_flops(eqn) if name == "dot_general" else _conv_flops(eqn)
            k = key(eqn)
            acc[k] = acc.get(k, 0) + mult * flops
        elif name == "cond":
            branches = []
            for b in eqn.params["branches"]:
                branch: dict[str, int] = {}
                _walk(b, mult, branch, key)
                branches.append(branch)
            for k, v in max(branches, key=lambda d: sum(d.values())).items():
                acc[k] = acc.get(k, 0) + v
        else:
            length = eqn.params.get("length", 1) if name == "scan" else 1
            for sub in _sub_jaxprs(eqn.params):
                _walk(sub, mult * length, acc, key)


def jaxpr_flops(jaxpr: Any) -> int:
    """Sum of 2 x multiply-adds of all matrix products and convolutions in a (closed) jaxpr.

    Recurses into nested jaxprs (jit, custom_jvp, remat, scan bodies times their length, the
    largest branch of a cond). ``while`` loops are counted once per body (their trip count is not
    static).
    """
    acc: dict[str, int] = {}
    _walk(jaxpr, 1, acc, _by_dtype)
    return sum(acc.values())


_SPLITS = {"dtype": _by_dtype, "kind": _by_kind}


def jaxpr_flops_split(jaxpr: Any, by: str) -> dict[str, int]:
    """:func:`jaxpr_flops` split ``by='dtype'`` (of each product's left operand:
    ``{'bfloat16': ..., 'float32': ...}``) or ``by='kind'`` (``'conv'``, ``'matmul'``: linear
    layers, ``'batched_matmul'``: products with batch dimensions, i.e. attention's QK^T and PV).
    """
    if by not in _SPLITS:
        raise ValueError(f"unknown split {by!r}; expected one of {sorted(_SPLITS)}")
    acc: dict[str, int] = {}
    _walk(jaxpr, 1, acc, _SPLITS[by])
    return acc


def flops_by_dtype(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Model FLOPs of ``fn(*args, **kwargs)`` by dtype (:func:`jaxpr_flops_split`): which share
    of the work a bf16 policy really runs in bf16."""
    return jaxpr_flops_split(jax.make_jaxpr(fn)(*args, **kwargs), "dtype")


def flops_by_kind(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, int]:
    """Model FLOPs of ``fn(*args, **kwargs)`` by kind of product (:func:`jaxpr_flops_split`), to
    see whether attention matters at a network's sizes."""
    return jaxpr_flops_split(jax.make_jaxpr(fn)(*args, **kwargs), "kind")


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> int:
    """Model FLOPs of one call ``fn(*args, **kwargs)``; arguments may be ``ShapeDtypeStruct``.

    Returns:
      An integer FLOP count (2 x multiply-adds of matmuls and convolutions).
    """
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs))
