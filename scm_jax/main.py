"""absl entry point: ``python -m scm_jax.main --config configs/mnist.py --workdir DIR``.

The same training as ``scm-jax train`` in the style of the Flax examples and big_vision:
``--config`` is an ml-collections config file (``path.py[:arg]``) with ``--config.a.b=v``
overrides, and absl flags (``--alsologtostderr``, ``--jax_...``) work as usual.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "the run's folder (resumed if it holds checkpoints)")
config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: Sequence[str]) -> int:
    """Train ``FLAGS.config`` in ``FLAGS.workdir``; returns the exit status."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from scm_jax import distributed
    from scm_jax.train.loop import train

    def log(line: str) -> None:  # called once the backend is up (after initialize)
        import jax

        logging.info("%s", line)
        if jax.process_index() == 0:
            print(line, flush=True)

    try:  # before anything touches a device (multi-process runs)
        distributed.initialize(log=log)
    except distributed.DistributedConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from scm_jax.train.errors import exit_status

    try:
        result = train(FLAGS.config, FLAGS.workdir, log=log)
    except Exception as e:  # one message, as `scm-jax train` gives (scm_jax/train/errors.py)
        status = exit_status(e)
        if status is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return status
    return 0 if result["interrupted"] is None else 128 + int(result["interrupted"])


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
