"""Network parameters as a PyTorch-style state dict: names, layouts, and the safetensors file.

The Flax tree ``params['enc_8x8_block0']['conv_res0']['weight']`` is the tensor
``enc_8x8_block0.conv_res0.weight``: the PyTorch module ``scm_jax.torch`` builds has exactly these
``state_dict`` names. Layouts are PyTorch's: a convolution weight stored HWIO ``(kh, kw, C_in,
C_out)`` in JAX is OIHW ``(C_out, C_in, kh, kw)``, a linear weight ``(C_in, C_out)`` is
``(C_out, C_in)``; gains (scalars) and stored Fourier features (1-D) are unchanged. Only
transpositions, so the round trip JAX -> file -> JAX is bit-identical. Numpy only: writing an
export needs neither torch nor jax.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax.files import atomic_path

# safetensors metadata: "pt" tells PyTorch tooling (transformers, diffusers) the layout is theirs.
METADATA = {"format": "pt", "producer": "scm-jax"}


def _leaf_to_torch(name: str, a: np.ndarray) -> np.ndarray:
    last = name.rsplit(".", 1)[-1]
    if last == "weight" and a.ndim == 4:
        a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif last == "weight" and a.ndim == 2:
        a = a.T  # (in, out) -> (out, in)
    return np.array(a, order="C")  # a C-contiguous copy (np.ascontiguousarray makes 0-d 1-D)


def _leaf_from_torch(name: str, a: np.ndarray) -> np.ndarray:
    last = name.rsplit(".", 1)[-1]
    if last == "weight" and a.ndim == 4:
        a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif last == "weight" and a.ndim == 2:
        a = a.T
    return np.array(a, order="C")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax network parameters (nested dict of arrays) -> ``{torch name: numpy array}`` in
    PyTorch layouts, same dtypes except bfloat16, stored as float32 (exactly; numpy's safetensors
    writer has no bfloat16)."""

    def host(a: Any) -> np.ndarray:
        a = np.asarray(a)
        return a.astype(np.float32) if a.dtype.name == "bfloat16" else a

    return {name: _leaf_to_torch(name, host(a)) for name, a in _flatten(params).items()}


def from_state_dict(
    state: Mapping[str, np.ndarray], abstract: Mapping[str, Any], *, where: str = "the file"
) -> dict[str, Any]:
    """``{torch name: array}`` -> the nested numpy parameter tree of ``abstract``.

    Args:
      state: tensors named and laid out as :func:`to_state_dict` writes them.
      abstract: the network's parameter tree (shapes and dtypes; e.g.
        ``NetworkDef.abstract_params()['net']``); each tensor is cast to its leaf's dtype.
      where: the source, for error messages.
    Raises:
      ValueError: missing, unexpected or wrongly shaped tensors (the message names them).
    """
    flat = _flatten(abstract)
    missing = sorted(set(flat) - set(state))
    unexpected = sorted(set(state) - set(flat))
    if missing or unexpected:
        raise ValueError(
            f"{where} does not fit this network: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (of {len(flat)} tensors)"
        )
    out: dict[str, Any] = {}
    for name, leaf in flat.items():
        a = _leaf_from_torch(name, np.asarray(state[name]))
        if tuple(a.shape) != tuple(leaf.shape):
            want = _leaf_to_torch(name, np.zeros(leaf.shape, np.int8)).shape
            raise ValueError(
                f"{where}: tensor {name} has shape {tuple(state[name].shape)}, the network "
                f"needs {tuple(want)}"
            )
        node = out
        *parents, last = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = a.astype(np.dtype(leaf.dtype), copy=False)
    return out


def save_safetensors(
    path: str | Path, state: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``state`` with ``safetensors.numpy`` (no pickle), via a temporary file and a rename
    (``metadata``: more header entries besides :data:`METADATA`)."""
    from safetensors.numpy import save_file

    with atomic_path(path) as tmp:  # the usual permissions, not safetensors' 0600
        save_file(dict(state), str(tmp), metadata={**METADATA, **(metadata or {})})


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Read a safetensors file as numpy arrays.

    Raises:
      FileNotFoundError: no such file; ValueError: not a readable safetensors file.
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {str(path)!r}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file ({first[:200]}); it is damaged "
            "or of another format: export it again"
        ) from None
