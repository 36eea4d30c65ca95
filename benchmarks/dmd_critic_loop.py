"""The DMD / rCM training step with its k critic updates unrolled (the default) or in a loop.

  python benchmarks/dmd_critic_loop.py                 # CPU: MNIST-S, batch 32, DMD k = 1, 5; rCM
  python benchmarks/dmd_critic_loop.py --config cifar10 --batch 128   # on a GPU
  python benchmarks/dmd_critic_loop.py --quick         # the toy MLP: checks that it runs (CI)

``scm_jax.train.step_dmd.make_dmd_train_step(unroll_critic=...)`` writes the k critic updates
of one step either as straight-line code or as one ``lax.scan``; the arithmetic is the same
(``tests/dmd_test.py``). For each objective and k both programs are compiled (compile time
recorded) from the config's real step (``dmd_step_from_config``: its options, EMAs, Adam, state
donated), with a random teacher of the student's architecture, and timed interleaved on the
same device-resident batch (``bench.time_interleaved``: the machine's load hits both alike).
Writes ``benchmarks/results/dmd_critic_loop_<platform>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp

from scm_jax import bench
from scm_jax.config import defaults
from scm_jax.networks import build_network
from scm_jax.optim import make_optimizer
from scm_jax.train import build
from scm_jax.train.dmd_config import dmd_state_fn, dmd_step_from_config

NAME = "dmd_critic_loop"


def compile_pair(spec: str, objective: str, k: int | None, batch: int) -> dict[str, Any]:
    """Both versions of one step, compiled; ``{'calls': {name: call}, 'rows': {name: row}}``."""
    sep = "," if ":" in spec else ":"  # 'mnist:size=s' or 'cifar10'
    cfg = defaults.load_config(f"{spec}{sep}objective={objective}")
    with cfg.unlocked():
        cfg.batch_size = batch
        if k is not None:
            cfg.dmd.critic_updates = k
    nd = build_network(cfg.model)
    tx, schedule = make_optimizer(**cfg.optim, batch_size=batch)
    teacher_fn, _ = build.abstract_teacher(cfg)
    t_nd = build_network(build.teacher_model_config(cfg.model))
    teacher = jax.jit(lambda key: t_nd.init(key)["net"])(jax.random.key(2))
    x0 = 0.5 * jax.random.normal(jax.random.key(1), (batch, *nd.sample_shape))
    labels = jnp.arange(batch, dtype=jnp.int32) % nd.num_classes if nd.num_classes else None
    make_state = jax.jit(dmd_state_fn(cfg, nd, tx))
    calls, rows = {}, {}
    for name, unroll in (("unrolled", True), ("loop", False)):
        step = dmd_step_from_config(cfg, nd, teacher_fn, tx=tx, schedule=schedule,
                                    unroll_critic=unroll)  # fmt: skip
        state = make_state(jax.random.key(0))
        compiled, stats = bench.compile_stats(jax.jit(step, donate_argnums=0), state, x0, labels,
                                              teacher)  # fmt: skip
        box = [state]

        def call(compiled: Any = compiled, box: list = box) -> Any:
            box[0], values = compiled(box[0], x0, labels, teacher)
            return values["loss"]

        calls[name] = call
        rows[name] = {"objective": objective, "critic_updates": int(cfg.dmd.critic_updates),
                      "critic": name, "batch": batch, "compile_s": stats["compile_s"],
                      "xla_flops": stats["xla_flops"]}  # fmt: skip
    return {"calls": calls, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_common_args(parser, NAME)
    parser.add_argument("--config", default="mnist:size=s", help="config spec (no objective)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dmd-k", default="1,5", help="DMD critic updates per step to compare")
    args = parser.parse_args(argv)
    _, out = bench.resolve_common(args, NAME)
    spec, batch = args.config, args.batch
    dmd_k = [int(k) for k in args.dmd_k.split(",")]
    if args.quick:  # the toy MLP: compiles in seconds
        spec, batch, dmd_k = "toy_gmm:smoke", 8, [2]
    reps = args.reps or (1 if args.quick else 5)
    plan = [("dmd", k) for k in dmd_k] + [("rcm", None)]
    config = {"config": spec, "batch": batch, "plan": plan, "reps": reps}
    results = bench.Results(out, NAME, "python " + " ".join(sys.argv), config)
    for objective, k in plan:
        pair = compile_pair(spec, objective, k, batch)
        timing = bench.time_interleaved(pair["calls"], warmup=1, reps=reps)
        loop_s = timing["loop"]["median_s"]
        for name, row in pair["rows"].items():
            t = timing[name]
            results.add({**row, "status": "ok", "median_s": t["median_s"], "iqr_s": t["iqr_s"],
                         "samples": t["samples"],
                         "loop_over_this": loop_s / t["median_s"]})  # fmt: skip
    results.finish()
    print(bench.markdown_table(results.rows, [
        ("objective", "objective", ""), ("k", "critic_updates", "d"), ("critic", "critic", ""),
        ("batch", "batch", "d"), ("s / step", "median_s", ".3f"), ("IQR s", "iqr_s", ".3f"),
        ("loop / this", "loop_over_this", ".2f"), ("compile s", "compile_s", ".1f"),
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
