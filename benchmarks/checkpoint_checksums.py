"""What checkpoint checksums cost (``scm_jax.run.checksums``), extrapolated to the XL state.

  python benchmarks/checkpoint_checksums.py [--gib 2] [--orbax-gib 0.5]
      # writes benchmarks/results/checkpoint_checksums.json

The XL network's training state (``configs/imagenet512.py:size=xl``, sCT: params, Adam's two
moments and the EMAs ``power_0.050``, ``power_0.100``) is sized from abstract shapes. The full
state does not fit this machine's memory twice, so the digest is measured on ``--gib`` GiB of
random float32 in 256 MiB files (the size of OCDBT's data files) and extrapolated by bytes: the
cost is linear in bytes (CRC-32 over every file). Checksums are computed from the page cache in
both places that use them: after orbax wrote the files (save) and after orbax read them
(restore). The save path also runs a real orbax save of ``--orbax-gib`` GiB with and without
the checksums, to show the wall-clock overhead of a whole asynchronous save.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scm_jax.config import defaults
from scm_jax.ema import ema_names
from scm_jax.networks import build_network
from scm_jax.run import checksums
from scm_jax.run.checkpoint import Checkpointer
from scm_jax.run.state import TrainState

OUT = Path(__file__).resolve().parent / "results" / "checkpoint_checksums.json"
FILE_BYTES = 256 << 20


def xl_state_bytes() -> dict[str, int]:
    """Bytes of the XL run's checkpoint (float32 master weights) from abstract shapes."""
    cfg = defaults.load_config("imagenet512:size=xl")
    net = build_network(cfg.model).abstract_params()["net"]
    net_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(net))
    n_emas = len(ema_names(cfg.ema.power_std, cfg.ema.halflife_kimg))
    return {"params": net_bytes, "adam_moments": 2 * net_bytes, "emas": n_emas * net_bytes,
            "total": (3 + n_emas) * net_bytes, "n_emas": n_emas}  # fmt: skip


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def digest_throughput(folder: Path, nbytes: int) -> dict[str, float]:
    """CRC-32 of ``nbytes`` of random files in ``folder/state``: as the checkpoint computes it
    (4 threads) and on one thread."""
    rng = np.random.default_rng(0)
    (folder / "state").mkdir(parents=True)
    left, i = nbytes, 0
    while left > 0:
        n = min(FILE_BYTES, left)
        (folder / "state" / f"{i:04d}").write_bytes(rng.bytes(n))
        left, i = left - n, i + 1
    pool = best_of(lambda: checksums.compute_checksums(folder, ("state",)))
    one = best_of(lambda: [checksums.file_crc(p) for p in sorted((folder / "state").iterdir())])
    return {
        "bytes": nbytes,
        "files": i,
        "seconds_threads": pool,
        "seconds_one_thread": one,
        "gb_per_s_threads": nbytes / pool / 1e9,
        "gb_per_s_one_thread": nbytes / one / 1e9,
    }


def orbax_save_overhead(folder: Path, nbytes: int) -> dict[str, float]:
    """Wall-clock of a real asynchronous save (``save`` + ``wait``) with and without checksums."""
    n = nbytes // 4 // 3  # params, one EMA, one moment-sized leaf
    leaf = jnp.asarray(np.random.default_rng(1).standard_normal(n, np.float32))
    state = TrainState(jnp.int32(1), {"net": {"w": leaf}}, ({"mu": leaf},), {"ema": {"w": leaf}},
                       jnp.zeros(2, jnp.uint32))  # fmt: skip
    out = {}
    for label, with_sums in (("without", False), ("with", True)):
        times = []
        for r in range(3):
            d = folder / f"{label}{r}"
            ckpt = Checkpointer(d, keep=1)
            write = checksums.write_checksums
            if not with_sums:  # the same save, its post-finalisation callback doing nothing
                checksums.write_checksums = lambda *a, **k: None
            t0 = time.perf_counter()
            ckpt.save(state, {"step": 1}, log=lambda _line: None)
            t_return = time.perf_counter() - t0
            ckpt.wait()
            times.append((t_return, time.perf_counter() - t0))
            ckpt.close()
            checksums.write_checksums = write
            assert (d / "checkpoints" / "1" / "checksums.json").exists() == with_sums
            shutil.rmtree(d)
        t_return, t_done = min(times, key=lambda t: t[1])
        out[f"save_returns_s_{label}"] = t_return
        out[f"save_on_disk_s_{label}"] = t_done
    out["bytes"] = 3 * n * 4
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="bytes digested (GiB)")
    parser.add_argument("--orbax-gib", type=float, default=0.5, help="bytes of the real save")
    args = parser.parse_args()
    sizes = xl_state_bytes()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        digest = digest_throughput(Path(tmp) / "files", int(args.gib * (1 << 30)))
        save = orbax_save_overhead(Path(tmp) / "orbax", int(args.orbax_gib * (1 << 30)))
    rate = digest["gb_per_s_threads"] * 1e9
    result = {
        "command": "python benchmarks/checkpoint_checksums.py "
        f"--gib {args.gib:g} --orbax-gib {args.orbax_gib:g}",
        "what": "CRC-32 of every checkpoint file (scm_jax.run.checksums); XL = "
        "configs/imagenet512.py:size=xl (sCT), float32 params + 2 Adam moments + EMAs",
        "xl_state_bytes": sizes,
        "measured_fraction_of_xl_state": digest["bytes"] / sizes["total"],
        "digest": digest,
        "xl_extrapolated": {
            "save_checksums_s": sizes["total"] / rate,  # orbax's thread, training goes on
            "restore_verify_s_train": sizes["total"] / rate,  # state + emas
            "restore_verify_s_sampler": sizes["emas"] / rate,  # emas only (samplers, export)
        },
        "orbax_save": save,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "jax": jax.__version__, "processor": platform.processor() or "unknown"},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
