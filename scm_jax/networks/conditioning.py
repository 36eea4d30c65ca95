"""The conditioning vector of a network: time, class label and (optionally) guidance scale.

emb = mp_silu(mp_sum(mp_sum(L_t(embed(c_noise(t))), L_s(embed(s))), L_y(onehot(y) sqrt(K))))

* time: c_noise(t) then a positional or Fourier embedding (see ``embeddings.py``);
* guidance scale s (sCD with a CFG teacher, sCM §5 / App. G): positional embedding, a linear
  layer, added to the time embedding like the label ("like label conditioning" in the paper);
* class label: EDM2's scaled one-hot through a linear layer; the null label (-1 or an all-zero
  vector) gives a zero class embedding, which is what label dropout for CFG trains.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from scm_jax.networks.embeddings import (
    C_NOISE_MODES,
    TIME_EMBEDDINGS,
    StoredFourier,
    c_noise,
    positional_embedding,
    time_embedding,
)
from scm_jax.networks.layers import MODULATIONS, MPConv, mp_silu, mp_sum

Array = jax.Array
Dtype = Any

NULL_LABEL = -1  # integer label meaning "no class" (unconditional branch of CFG)


def check_conditioning_args(
    modulation: str, time_embedding: str, c_noise_mode: str, dropout: float, label_dropout: float
) -> None:
    """Raise ValueError naming the value if a conditioning option or dropout rate is invalid."""
    for name, value, choices in (
        ("modulation", modulation, MODULATIONS),
        ("time_embedding", time_embedding, TIME_EMBEDDINGS),
        ("c_noise_mode", c_noise_mode, C_NOISE_MODES),
    ):
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
    for name, p in (("dropout", dropout), ("label_dropout", label_dropout)):
        if not 0 <= p < 1:
            raise ValueError(f"{name}={p} must be in [0, 1)")


def batch_times(t: Array | float, batch: int) -> Array:
    """Broadcast a scalar or ``(B,)`` time to ``(B,)``; raise on any other shape."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        raise TypeError(f"time t must be a float array, got dtype {t.dtype}")
    if t.ndim == 0:
        return jnp.broadcast_to(t, (batch,))
    if t.shape != (batch,):
        raise ValueError(f"time t must be a scalar or have shape ({batch},), got {t.shape}")
    return t


def label_vectors(labels: Array | None, num_classes: int, batch: int, dtype: Dtype) -> Array:
    """Class labels as ``(B, K)`` float vectors.

    ``labels`` may be None (all unconditional), integer ``(B,)`` in [0, K) or -1 (null label),
    or float ``(B, K)`` (one-hot, soft, or all-zero for null).
    """
    if labels is None:
        return jnp.zeros((batch, num_classes), dtype)
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != (batch,):
            raise ValueError(f"integer labels must have shape ({batch},), got {labels.shape}")
        return jax.nn.one_hot(labels, num_classes, dtype=dtype)  # -1 -> all zeros
    if labels.shape != (batch, num_classes):
        raise ValueError(
            f"float labels must have shape ({batch}, {num_classes}) (one-hot), got {labels.shape}"
        )
    return labels.astype(dtype)


class ConditionEmbedding(nn.Module):
    """Maps (t, labels, guidance) to the ``(B, emb_channels)`` conditioning vector.

    Attributes:
      noise_channels: width of the time (and guidance) sinusoidal features.
      emb_channels: width of the output embedding.
      num_classes: K (0: unconditional network, labels must be None).
      guidance_input: whether the network takes a per-sample guidance scale.
      label_dropout: probability of replacing a label by the null label in training (CFG).
      time_embedding: ``'positional'`` (sCM), ``'fourier'`` (EDM2) or ``'edm2_fourier'``
        (EDM2 with stored frequencies, for imported weights).
      c_noise_mode: ``'t'`` (sCM) or ``'edm'`` (EDM2's ln(sigma)/4).
      c_noise_scale: multiplier of t when ``c_noise_mode='t'`` (1 in the paper).
      sigma_d: data std, needed by ``c_noise_mode='edm'``.
      label_balance: EDM2's mp_sum weight of the class embedding.
    """

    noise_channels: int
    emb_channels: int
    num_classes: int = 0
    guidance_input: bool = False
    label_dropout: float = 0.0
    time_embedding: str = "positional"
    c_noise_mode: str = "t"
    c_noise_scale: float = 1.0
    sigma_d: float = 0.5
    label_balance: float = 0.5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, t: Array, labels: Array | None, guidance: Array | None, train: bool
    ) -> Array:
        """Return the embedding ``(B, emb_channels)``; ``t`` is ``(B,)``."""
        batch = t.shape[0]
        kw = {"dtype": self.dtype, "param_dtype": self.param_dtype}
        fdtype = jnp.promote_types(t.dtype, jnp.float32)
        c = c_noise(t, self.c_noise_mode, self.sigma_d, self.c_noise_scale)
        if self.time_embedding == "edm2_fourier":
            feats = StoredFourier(self.noise_channels, self.param_dtype, name="emb_fourier")(c)
        else:
            feats = time_embedding(c, self.time_embedding, self.noise_channels)
        emb = MPConv(self.emb_channels, name="emb_noise", **kw)(feats)
        if self.guidance_input:
            if guidance is None:
                raise ValueError(
                    "this network takes a guidance scale: pass guidance= of shape (B,) "
                    "(1.0 means no guidance)"
                )
            s = batch_times(jnp.asarray(guidance, fdtype), batch)
            g = MPConv(self.emb_channels, name="emb_guidance", **kw)(
                positional_embedding(s, self.noise_channels)
            )
            emb = mp_sum(emb, g, t=0.5)
        elif guidance is not None:
            raise ValueError(
                "guidance was given but this network has no guidance input "
                "(build it with guidance_input=True, as the sCD CFG configs do)"
            )
        if self.num_classes:
            onehot = label_vectors(labels, self.num_classes, batch, fdtype)
            if train and self.label_dropout > 0:
                keep = jax.random.bernoulli(
                    self.make_rng("dropout"), 1 - self.label_dropout, (batch,)
                )
                onehot = onehot * keep[:, None].astype(fdtype)
            y = MPConv(self.emb_channels, name="emb_label", **kw)(
                onehot * math.sqrt(self.num_classes)
            )
            emb = mp_sum(emb, y, t=self.label_balance)
        elif labels is not None:
            raise ValueError("labels were given but this network is unconditional (num_classes=0)")
        return mp_silu(emb)
