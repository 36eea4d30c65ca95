"""A run's files (floor 3 of docs/architecture.md): everything that knows how a run is stored.

- ``layout``: the work directory (``config.json``, resuming rules, identity checks).
- ``state``: the :class:`~scm_jax.run.state.TrainState` a checkpoint holds, created in its sharding.
- ``checkpoint`` (+ ``checksums``, ``orbax_console``): orbax checkpoints, their CRC-32 checksums,
  fallback past damaged ones.
- ``emas``: which EMA network to read, from a checkpoint or an export folder.
- ``snapshots``: the power-EMA snapshots ``scm-jax phema`` reconstructs from.
- ``exports`` (+ ``state_dict``): export folders (``model.safetensors`` + ``config.json``).
- ``sampler``: ``scm_jax.load_sampler(workdir)``, a finished run as a sampler.

Training writes runs and every program reads them through this package; it imports only the
math and building blocks below it (never configs or programs), so that sampling, evaluating or
exporting a run never needs the training loop.
"""
