"""Deprecated alias of :mod:`scm_jax.config.defaults`, for config files written before 2026-12.

``from scm_jax import configlib`` gives the same module object as ``from scm_jax.config import
defaults`` (nothing here to keep in step); new config files use the latter.
"""

import sys

from scm_jax.config import defaults

sys.modules[__name__] = defaults
