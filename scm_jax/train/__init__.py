"""The training system: state, step, loop, checkpoints, metrics."""
