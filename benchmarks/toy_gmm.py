"""sCD (exact teacher) and sCT on the 2-D ring mixture: flow-map error and sliced Wasserstein.

  python benchmarks/toy_gmm.py        # writes benchmarks/results/toy_gmm.json

The recipe is ``scm_jax.toy.recipes`` (also run by tests/toy_training_test.py).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import jax

from scm_jax.toy import recipes

OUT = Path(__file__).resolve().parent / "results" / "toy_gmm.json"


def main() -> None:
    rows = []
    for objective in ("scd", "sct"):
        m = recipes.run(objective, num_samples=16384)
        rows.append(m)
        print(
            f"{objective}: flow-map error {m['flow_map_error']:.4f} x std, SW2 1-step "
            f"{m['sw_1step']:.4f}, 2-step {m['sw_2step']:.4f}, "
            f"exact teacher {m['sw_teacher']:.4f}, "
            f"data floor {m['sw_data_floor']:.4f}, prior {m['sw_noise']:.4f} "
            f"({m['steps']} steps, {m['train_seconds']:.0f} s)",
            flush=True,
        )
    meta = {
        "command": "python benchmarks/toy_gmm.py",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "device": str(jax.devices()[0].device_kind),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
