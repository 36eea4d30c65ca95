"""Parameters, FLOPs and training-state memory of every EDM2 size, on abstract shapes.

  python benchmarks/model_sizes.py            # writes benchmarks/results/model_sizes.json
                                              # and prints the markdown table of docs/models.md

No accelerator is needed: everything is computed with ``scm_jax.info.model_info`` from traced
programs (FLOPs = 2 x multiply-adds of matmuls and convolutions).
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import jax

from scm_jax.config import defaults
from scm_jax.info import model_info
from scm_jax.networks import EDM2_CHANNELS

OUT = Path(__file__).resolve().parent / "results" / "model_sizes.json"


def main() -> None:
    rows = []
    for size in EDM2_CHANNELS:
        t0 = time.time()
        info = model_info(defaults.load_config(f"imagenet512:size={size},objective=scd"), 64)
        rows.append({"size": size, **info})
        print(f"{size}: {time.time() - t0:.1f} s", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/model_sizes.py",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "device": "none (abstract shapes)",
        "config": "configs/imagenet512.py:size=<size>,objective=scd (64x64x4, 1000 classes)",
    }
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {OUT}\n")
    print(
        "| size | channels | stock EDM2 params (M) | sCM student params (M) | added by sCM (M) "
        "| forward GFLOP | JVP / forward | sCT / sCD / sCD-CFG step GFLOP "
        "| state GiB (total / per device of 64) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    gib = 2**30
    for r in rows:
        s = r["train_step_gflops"]
        print(
            f"| {r['size']} | {EDM2_CHANNELS[r['size']]} | {r['params_stock_edm2'] / 1e6:.1f} "
            f"| {r['params'] / 1e6:.1f} | {r['params_added_by_scm_conditioning'] / 1e6:.1f} "
            f"| {r['forward_gflops']:.1f} | {r['jvp_over_forward']:.3f} "
            f"| {s['sct']:.0f} / {s['scd']:.0f} / {s['scd_cfg']:.0f} "
            f"| {r['state_bytes'] / gib:.1f} / {r['state_bytes_per_device'] / gib:.2f} |"
        )


if __name__ == "__main__":
    main()
