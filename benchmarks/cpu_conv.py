"""XLA:CPU convolution costs: forward, and forward + gradients with the two implementations.

  python benchmarks/cpu_conv.py

``scm_jax.networks.layers.conv2d_same`` differentiates the weight of a 3x3 convolution through a
patch matrix on CPUs (``impl='matmul_dw'``) because XLA:CPU's native weight-gradient convolution
(``impl='xla'``) costs many forward passes. This measures both on the embedded default's largest
convolution shape (batch 32 and 128, 28x28, 32 channels), and ``'auto'`` (the default, which
switches at ``MATMUL_DW_MIN_POSITIONS``), and writes
``benchmarks/results/cpu_conv.json``; then the MNIST default's whole sCT train step (one
device) at batch 32 and 128 with each implementation. Ratios measured in one run are what
count on a noisy machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.config import defaults
from scm_jax.networks import build_network, layers
from scm_jax.networks.layers import conv2d_same
from scm_jax.optim import make_optimizer
from scm_jax.run.state import init_state
from scm_jax.train.step import make_train_step

RESULTS = Path(__file__).resolve().parent / "results" / "cpu_conv.json"


def median_seconds(fn, *args, reps: int = 7) -> float:
    """Median wall time of a jitted call (after one warm-up call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def train_step_seconds(batch: int, impl: str) -> float:
    """Median seconds of the MNIST default's sCT train step with every conv forced to ``impl``.

    The U-Net calls ``conv2d_same`` with its default ``impl``; for this measurement only, the
    default is swapped (and restored afterwards).
    """
    saved = conv2d_same.__defaults__
    layers.conv2d_same.__defaults__ = (impl,)
    try:
        cfg = defaults.load_config("mnist")
        nd = build_network(cfg.model)
        tx, schedule = make_optimizer(**cfg.optim, batch_size=batch)
        ema = {"power_std": (), "halflife_kimg": cfg.ema.halflife_kimg}
        state = jax.jit(lambda k: init_state(nd, tx, k, **ema))(jax.random.key(0))
        step_fn = make_train_step(
            nd, tx, schedule, objective="sct", sigma_d=0.5, P_mean=-1.0, P_std=1.4,
            batch_size=batch, **ema,
        )  # fmt: skip
        step = jax.jit(step_fn)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.uniform(-1, 1, (batch, 28, 28, 1)), jnp.float32)
        y = jnp.arange(batch, dtype=jnp.int32) % 10
        return median_seconds(lambda s: step(s, x, y, None)[1]["loss"], state, reps=5)
    finally:
        layers.conv2d_same.__defaults__ = saved


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for batch in (32, 128):
        x = jnp.asarray(rng.normal(size=(batch, 28, 28, 32)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
        row = {"batch": batch, "shape": "28x28x32 -> 32, 3x3"}
        row["forward_s"] = median_seconds(jax.jit(lambda x, w: conv2d_same(x, w, "xla")), x, w)
        for impl in ("xla", "matmul_dw", "auto"):
            grad = jax.jit(jax.grad(lambda x, w, i=impl: conv2d_same(x, w, i).sum(), (0, 1)))
            row[f"fwd_bwd_{impl}_s"] = median_seconds(grad, x, w)
        row["speedup_matmul_dw"] = row["fwd_bwd_xla_s"] / row["fwd_bwd_matmul_dw_s"]
        rows.append(row)
        print(row)
    steps = []
    for batch in (32, 128):
        row = {"batch": batch, **{f"{i}_s_per_step": train_step_seconds(batch, i)
                                  for i in ("xla", "matmul_dw", "auto")}}  # fmt: skip
        steps.append(row)
        print(row)
    out = {
        "command": "python benchmarks/cpu_conv.py",
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "rows": rows,
        "mnist_default_sct_step": steps,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
