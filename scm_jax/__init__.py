"""scm-jax: continuous-time consistency models (sCM; Lu & Song 2024) in JAX/Flax.

Modules: ``trigflow`` (the noise process and conversions), ``networks`` (EDM2-style U-Net, toy MLP,
adaptive weighting head), ``configlib`` (configs), ``flops`` and ``info`` (cost on abstract shapes),
``cli`` (the ``scm-jax`` command).
"""

__version__ = "0.1.0"
