"""``python -m scm_jax ...`` is the ``scm-jax`` command."""

import sys

from scm_jax.cli import main

sys.exit(main())
