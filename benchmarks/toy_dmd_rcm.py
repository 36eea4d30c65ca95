"""sCD vs DMD vs rCM on 2-D Gaussian mixtures with the exact teacher: flow-map error, sliced
Wasserstein, mode coverage (mass per mode against the weights) and precision (distance of samples
to the nearest mode), at an equal number of generator updates.

  python benchmarks/toy_dmd_rcm.py     # writes benchmarks/results/toy_dmd_rcm.json (~1 h CPU)

Two mixtures (the 8-component ring of benchmarks/toy_gmm.py and a 5 x 5 grid of narrow modes)
and two students, each started (student and critic) from a diffusion model of its own
architecture on that mixture: the reference MP-MLP (4 blocks of 128) and a capacity-limited one
(one block of 16), over several training seeds. The recipes are ``scm_jax.toy.recipes.DISTILL``
(also run by tests/toy_dmd_test.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np

from scm_jax.toy import recipes

OUT = Path(__file__).resolve().parent / "results" / "toy_dmd_rcm.json"
KEYS = ("flow_map_error", "sw_1step", "sw_2step")
MODE_KEYS = ("coverage_tv", "modes_covered", "precision_dist", "precision_in_radius")


def summarize(rows: list[dict]) -> dict:
    """Mean and min/max over seeds of the scalar metrics of one (model, objective)."""
    out = {}
    for k in KEYS:
        v = np.array([r[k] for r in rows])
        out[k] = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}
    for steps in ("1step", "2step", "data"):
        for k in MODE_KEYS:
            v = np.array([r[f"modes_{steps}"][k] for r in rows], float)
            out[f"{k}_{steps}"] = {"mean": float(v.mean()), "min": float(v.min()),
                                   "max": float(v.max())}  # fmt: skip
    out["train_seconds"] = float(np.mean([r["train_seconds"] for r in rows]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds of the small MLP")
    parser.add_argument("--reference-seeds", type=int, default=1,
                        help="training seeds of the reference MLP")  # fmt: skip
    parser.add_argument("--steps", type=int, default=recipes.DISTILL_STEPS)
    parser.add_argument("--num-samples", type=int, default=16384, help="evaluation samples")
    args = parser.parse_args()
    models = {"reference": (recipes.MLP, args.reference_seeds),
              "small": (recipes.SMALL_MLP, args.seeds)}  # fmt: skip
    rows, summary = [], {}
    t0 = time.time()
    for mixture, (model_name, (model, seeds)) in itertools.product(recipes.MIXTURES,
                                                                    models.items()):  # fmt: skip
        init = recipes.pretrain(model, mixture)
        for name in recipes.DISTILL:
            group = []
            for seed in range(seeds):
                m = recipes.run_distill(name, init, model, mixture, steps=args.steps, seed=seed,
                                        num_samples=args.num_samples)  # fmt: skip
                m["model_name"] = model_name
                group.append(m)
                m1 = m["modes_1step"]
                print(
                    f"{mixture} {model_name:9s} {name:7s} seed {seed}: "
                    f"flow-map {m['flow_map_error']:.3f} "
                    f"SW2 1-step {m['sw_1step']:.4f} | coverage TV {m1['coverage_tv']:.4f} "
                    f"({m1['modes_covered']}) | precision: dist {m1['precision_dist']:.3f} "
                    f"std, in 2 std {m1['precision_in_radius']:.3f} "
                    f"({m['train_seconds']:.0f} s; {time.time() - t0:.0f} s total)",
                    flush=True,
                )
            rows += group
            summary[f"{mixture}/{model_name}/{name}"] = summarize(group)
    meta = {
        "command": "python benchmarks/toy_dmd_rcm.py",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "device": str(jax.devices()[0].device_kind),
        "steps": args.steps,
        "pretrain_steps": recipes.PRETRAIN_STEPS,
        "num_samples": args.num_samples,
        "total_seconds": time.time() - t0,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
