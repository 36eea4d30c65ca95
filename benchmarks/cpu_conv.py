"""XLA:CPU convolution costs: forward, and forward + gradients with the two implementations.

  python benchmarks/cpu_conv.py

``scm_jax.networks.layers.conv2d_same`` differentiates the weight of a 3x3 convolution through a
patch matrix on CPUs (``impl='matmul_dw'``) because XLA:CPU's native weight-gradient convolution
(``impl='xla'``) costs many forward passes. This measures both on the embedded default's largest
convolution shape (batch 32 and 128, 28x28, 32 channels) and writes
``benchmarks/results/cpu_conv.json``. Ratios measured in one run are what count on a noisy
machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.networks.layers import conv2d_same

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


def main() -> None:
    rng = np.random.default_rng(0)
    rows = []
    for batch in (32, 128):
        x = jnp.asarray(rng.normal(size=(batch, 28, 28, 32)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(3, 3, 32, 32)), jnp.float32)
        row = {"batch": batch, "shape": "28x28x32 -> 32, 3x3"}
        row["forward_s"] = median_seconds(jax.jit(lambda x, w: conv2d_same(x, w, "xla")), x, w)
        for impl in ("xla", "matmul_dw"):
            grad = jax.jit(jax.grad(lambda x, w, i=impl: conv2d_same(x, w, i).sum(), (0, 1)))
            row[f"fwd_bwd_{impl}_s"] = median_seconds(grad, x, w)
        row["speedup_matmul_dw"] = row["fwd_bwd_xla_s"] / row["fwd_bwd_matmul_dw_s"]
        rows.append(row)
        print(row)
    out = {
        "command": "python benchmarks/cpu_conv.py",
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
