"""scm-jax: continuous-time consistency models (sCM; Lu & Song 2024) in JAX/Flax.

Modules: ``trigflow`` (the noise process and conversions), ``networks`` (EDM2-style U-Net, toy MLP,
adaptive weighting head), ``losses``, ``sampling``, ``train`` (the training system), ``sampler``
(``load_sampler``), ``config`` (configs), ``flops`` and ``info`` (cost on abstract shapes),
``cli`` (the ``scm-jax`` command).

``scm_jax.load_sampler(workdir)`` is imported lazily, so ``import scm_jax`` stays cheap.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_sampler"]


def __getattr__(name: str) -> Any:
    if name == "load_sampler":
        from scm_jax.run.sampler import load_sampler

        return load_sampler
    raise AttributeError(f"module 'scm_jax' has no attribute {name!r}")
