"""Every bad input a user can give the ``scm-jax`` commands exits non-zero with one clear message
and no traceback; the table in docs/reliability.md is generated from :data:`CASES`.

A case is one line: a name, the arguments (``{name}`` stands for a fixture path from
:func:`make_fixtures`), a fragment the message must contain, and the exit status. Most run
in-process through ``scm_jax.cli.main``; those marked ``subprocess`` run ``python -m scm_jax`` to
prove the console shows no traceback. Regenerate the docs table after changing a case or a
message with::

    python tests/bad_inputs_test.py --write-docs
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the same simulated devices and options as conftest.py
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"
ORBAX_DETAIL = r"\((ValueError|KeyError|FileNotFoundError|JSONDecodeError): [^\n]*?\)\. It is"


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: ``scm-jax *argv`` must exit with ``code`` and a message containing
    ``expect``; ``mask``: regexes of third-party text to elide in the docs table."""

    name: str
    argv: tuple[str, ...]
    expect: str
    code: int = 2
    subprocess: bool = False
    mask: tuple[str, ...] = ()
    elide: tuple[tuple[str, str], ...] = ()  # (regex, what the docs show instead)


def case(name: str, args: str, expect: str, **kw) -> Case:
    """A :class:`Case` from a shell-like argument string (split on spaces)."""
    return Case(name, tuple(args.split()), expect, **kw)


TOY_NPZ = "--config.dataset.source=npz --config.dataset.num_examples=0 --config.dataset.path="
# The fixture run's config: the toy, class-conditional on synthetic data (3 classes).
TOY_COND = ("--config toy_gmm:smoke --config.dataset.source=synthetic "
            "--config.dataset.num_classes=3 --config.model.num_classes=3")  # fmt: skip
CASES: list[Case] = [
    # command line and config files
    case("unknown command", "trian --config mnist", "unknown command 'trian'"),
    case("missing --workdir", "train --config toy_gmm:smoke", "required: --workdir"),
    case("missing --config", "train --workdir {tmp}/x", "--config is required"),
    case("config file not found", "config --config nope", "config file 'nope' not found"),
    case("unknown config argument", "config --config mnist:sizee=s",
         "unknown config argument 'sizee'"),
    case("unknown objective", "config --config mnist:objective=sctt",
         "unknown objective 'sctt'"),
    case("unknown override field", "train --config toy_gmm:smoke --config.optim.lrr=1 "
         "--workdir {tmp}/x", "unknown config field 'optim.lrr'", subprocess=True),
    case("override of the wrong type", "config --config toy_gmm:smoke --config.batch_size=eight",
         "bad override"),
    # config values (scm_jax.config.validate: every problem, one line each)
    case("P_std <= 0", "train --config toy_gmm:smoke --config.trigflow.P_std=0 "
         "--workdir {tmp}/x", "trigflow.P_std=0.0: must be > 0"),
    case("dropout >= 1", "train --config mnist:smoke --config.model.dropout=1.0 "
         "--workdir {tmp}/x", "model.dropout=1.0: must be >= 0 and < 1"),
    case("tangent c <= 0", "train --config toy_gmm:smoke --config.loss.tangent_c=0 "
         "--workdir {tmp}/x", "loss.tangent_c=0.0: must be > 0"),
    case("t_mid outside (0, t_max)", "train --config toy_gmm:smoke --config.trigflow.t_mid=1.6 "
         "--workdir {tmp}/x", "must be in (0, t_max) = (0, 1.56455)"),
    case("several problems at once", "train --config toy_gmm:smoke --config.trigflow.P_std=-1 "
         "--config.optim.lr=0 --config.model.dropout=2 --workdir {tmp}/x",
         "3 problems in the config:", subprocess=True),
    case("unknown choice", "config --check --config toy_gmm:smoke --config.loss.warmup_form=x",
         "loss.warmup_form='x': must be one of 'scm', 'rcm'"),
    case("negative K", "config --check --config toy_gmm:smoke "
         "--config.train.max_consecutive_nonfinite=-1",
         "train.max_consecutive_nonfinite=-1: must be >= 0"),
    case("batch vs micro-batches", "train --config toy_gmm:smoke --config.train.micro_batches=3 "
         "--workdir {tmp}/x", "batch_size=8 is not divisible by train.micro_batches=3"),
    case("batch vs devices", "train --config toy_gmm:smoke --config.batch_size=12 "
         "--workdir {tmp}/x", "batch_size 12 is not divisible by data x fsdp = 8 x 1"),
    case("mesh vs devices", "train --config toy_gmm:smoke --config.mesh.fsdp=3 --workdir {tmp}/x",
         "devices cannot be split"),
    case("data shape vs network", "config --check --config mnist:smoke "
         "--config.model.img_resolution=32", "dataset.shape=(28, 28, 1) but the network takes"),
    case("periodic FID without reference", "train --config mnist:smoke "
         "--config.evals.every_kimg=1 --workdir {tmp}/x", "needs reference statistics"),
    # data, teacher, init_from
    case("missing data path", "train --config cifar10:smoke --config.dataset.source=image_folder "
         "--config.dataset.path={tmp}/cifar --workdir {tmp}/x", "'{tmp}/cifar' (source "
         "'image_folder') does not exist"),
    case("data of the wrong shape", f"train --config toy_gmm:smoke {TOY_NPZ}{{points3}} "
         "--workdir {tmp}/x", "gives examples of shape (3,) but dataset.shape is (2,)"),
    case("sCD without a teacher", "train --config mnist:smoke,objective=scd --workdir {tmp}/x",
         "sCD needs a teacher"),
    case("teacher folder not a run", "train --config mnist:smoke,objective=scd "
         "--config.teacher.workdir={tmp}/none --workdir {tmp}/x",
         "is not a training run's folder"),
    case("teacher not a diffusion run", "train --config toy_gmm:smoke,objective=scd "
         "--config.teacher.kind= --config.teacher.workdir={run} --workdir {tmp}/x",
         "sCD distils a diffusion model"),
    case("teacher of another architecture", "train --config mnist:smoke,objective=scd "
         "--config.teacher.workdir={toy_teacher} --workdir {tmp}/x", "has another architecture"),
    case("teacher trained on data at another scale", "train --config mnist:smoke,objective=scd "
         "--config.dataset.normalize=none --config.teacher.workdir={mnist_teacher} "
         "--workdir {tmp}/x", "was trained on data at another scale"),
    case("normalisation without statistics", "config --check --config mnist:smoke "
         "--config.dataset.mean=() --config.dataset.std=()",
         "needs dataset.mean and dataset.std"),
    case("tangent warm-up longer than the run", "config --check --config mnist:smoke,objective=sct"
         " --config.loss.tangent_warmup_steps=0 --config.loss.tangent_warmup_fraction=0"
         " --config.loss.tangent_warmup_kimg=1",
         "is longer than the run"),
    case("a duration in two units", "config --check --config mnist:objective=sct "
         "--config.loss.tangent_warmup_steps=100", "are both set; give the duration in one unit"),
    case("data-stats: negative --num", "data-stats --config mnist --num -1",
         "--num must be >= 0"),
    case("init_from not a run", "train --config toy_gmm:smoke --config.init_from={tmp}/none "
         "--workdir {tmp}/x", "init_from '{tmp}/none' is not a training run's folder"),
    # workdirs and checkpoints
    case("another run's workdir", "train --config toy_gmm:smoke,objective=diffusion "
         "--workdir {run}", "holds checkpoints of a run with another config"),
    case("checkpoint of another run", "train --config toy_gmm:smoke --workdir {nocfg}",
         "belongs to a run with another config (dataset.num_classes: 3 there, 0 here"),
    case("all checkpoints damaged", f"train {TOY_COND} --workdir {{damaged}}",
         "could not be restored", mask=(ORBAX_DETAIL,)),
    case("NaN in every batch", f"train --config toy_gmm:smoke {TOY_NPZ}{{nan}} "
         "--config.train.max_consecutive_nonfinite=2 --workdir {tmp}/nan",
         "stopped at step 3: the last 3 steps (from step 1) had a non-finite loss", code=1),
    # sample
    case("sample: not a run", "sample --workdir {tmp}/none --out {tmp}/s.npz",
         "is not a training run's folder", subprocess=True),
    case("sample: num <= 0", "sample --workdir {run} --num 0 --out {tmp}/s.npz",
         "--num (0) and --steps (2) must be >= 1"),
    case("sample: label out of range", "sample --workdir {run} --labels 5 --out {tmp}/s.npz",
         "labels must lie in [0, 3)"),
    case("sample: bad labels", "sample --workdir {run} --labels a --out {tmp}/s.npz",
         "expected ints like 3, 0,1,2 or 0-9"),
    case("sample: guidance without a guidance input", "sample --workdir {run} --guidance 2 "
         "--out {tmp}/s.npz", "this model has no guidance input"),
    case("sample: unknown EMA", "sample --workdir {run} --ema power_0.100 --out {tmp}/s.npz",
         "the run keeps EMAs ['halflife']; no 'power_0.100'"),
    case("sample: grid of points", "sample --workdir {run} --out {tmp}/s.png",
         "this model makes points, not images"),
    case("sample: output folder missing", "sample --workdir {run} --out {tmp}/no/s.npz",
         "does not exist"),
    case("sample: damaged checkpoint", "sample --workdir {damaged} --out {tmp}/s.npz",
         "could not be restored", subprocess=True, mask=(ORBAX_DETAIL,)),
    # eval and fid-stats
    case("eval: not a run", "eval --workdir {tmp}/none --ref {tmp}/ref.npz",
         "is not a training run's folder"),
    case("eval: num < 2", "eval --workdir {run} --ref {tmp}/ref.npz --num 1",
         "at least 2 samples, got num=1"),
    case("eval: steps <= 0", "eval --workdir {run} --ref {tmp}/ref.npz --steps 0",
         "steps must be >= 1"),
    case("eval: even teacher NFE", "eval --workdir {run} --ref {tmp}/ref.npz --teacher-nfe 4",
         "the NFE must be odd"),
    case("eval: model without images", "eval --workdir {run} --ref {tmp}/ref.npz",
         "FID needs images"),
    case("eval --consistency: no teacher", "eval --workdir {run} --consistency",
         "names no teacher to compare with: pass --teacher DIR"),
    case("eval --consistency: time beyond t_max", "eval --workdir {run} --consistency "
         "--times 0.5,1.6", "consistency time 1.6 is outside (0, t_max = 1.56455]"),
    case("eval --consistency with --ref", "eval --workdir {run} --consistency --ref "
         "{tmp}/ref.npz", "--consistency measures no FID: drop --ref"),
    case("eval without --ref", "eval --workdir {run}", "FID needs --ref FILE.npz"),
    case("consistency error of a diffusion run", "config --check --config "
         "toy_gmm:smoke,objective=diffusion --config.evals.consistency_every_kimg=1",
         "a diffusion run is the teacher itself"),
    case("fid-stats: data not found", "fid-stats --data {tmp}/none --out {tmp}/s.npz",
         "no such file or folder"),
    case("fid-stats: num < 2", "fid-stats --data mnist5k --out {tmp}/s.npz --num 1",
         "need at least 2 images"),
    case("fid-stats: output not .npz", "fid-stats --data mnist5k --out {tmp}/s.txt",
         "written as an .npz file"),
    case("fid-stats: reference not found", "fid-stats --data mnist5k --out {tmp}/s.npz "
         "--ref {tmp}/ref.npz", "no FID statistics at"),
    case("fid-stats: Inception weights not found", "fid-stats --data mnist5k --out {tmp}/s.npz "
         "--inception {tmp}/none.npz", "{tmp}/none.npz"),
    # DMD / rCM (the dmd section and its rules)
    case("dmd: unknown rollout", "config --check --config mnist:smoke,objective=dmd "
         "--config.dmd.rollout=backward", "dmd.rollout='backward': must be one of"),
    case("dmd: no critic updates", "config --check --config mnist:smoke,objective=dmd "
         "--config.dmd.critic_updates=0", "dmd.critic_updates=0: must be >= 1"),
    case("rcm: micro-batches", "config --check --config mnist:smoke,objective=rcm "
         "--config.train.micro_batches=2", "gradient accumulation is not implemented"),
    case("dmd: guidance range without a guidance input", "config --check --config "
         "mnist:smoke,objective=dmd --config.teacher.guidance_max=2",
         "needs model.guidance_input=True"),
    # export and import-edm2
    case("export: not a run", "export --workdir {tmp}/none --to safetensors --out {tmp}/e",
         "--workdir '{tmp}/none' is not a folder"),
    case("export: unknown format", "export --workdir {run} --to tflite --out {tmp}/e",
         "unknown format"),
    case("export: step that does not exist", "export --workdir {run} --to safetensors "
         "--step 7 --out {tmp}/e", "no checkpoint at step 7"),
    case("export: unknown EMA", "export --workdir {run} --to safetensors --ema nope "
         "--out {tmp}/e", "no 'nope'"),
    case("export: corrupt weights file", "export --workdir {corrupt_export} --to safetensors "
         "--out {tmp}/e", "is not a readable safetensors file", subprocess=True),
    case("export: --out is a file", "export --workdir {run} --to safetensors --out {points3}",
         "is a file"),
    case("import-edm2: a pickle", "import-edm2 --from {pickle} --out {tmp}/i",
         "pickles that only EDM2's own code can load"),
    case("import-edm2: file not found", "import-edm2 --from {tmp}/none.safetensors "
         "--out {tmp}/i", "{tmp}/none.safetensors"),
    # phema (EDM2 post-hoc EMA)
    case("phema: not a run", "phema --workdir {tmp}/none --sigma-rel 0.05",
         "is not a training run's folder"),
    case("phema: no snapshots", "phema --workdir {run} --sigma-rel 0.05",
         "has no EMA snapshots", subprocess=True),
    case("phema: one snapshot", "phema --workdir {snap1} --sigma-rel 0.05", "has 1 EMA snapshot"),
    case("phema: sigma_rel out of range", "phema --workdir {snaps} --sigma-rel 0.05,0.3",
         "sigma_rel must be in (0, 0.2887)"),
    case("phema: step after the last snapshot", "phema --workdir {snaps} --sigma-rel 0.05 "
         "--at-step 3", "must lie between step 1 and the last snapshot's step 2"),
    # info
    case("info: bad --mesh", "info --config mnist --mesh data=x", "expected AXIS=SIZE pairs"),
    # output paths (scm_jax.files: checked before any work; an existing file is never touched)
    case("sample: --out is a folder", "sample --workdir {run} --out {dir_npz}",
         "is a folder; give a file name"),
    case("sample: --out is read-only", "sample --workdir {run} --out {readonly}",
         "is read-only; choose another file or make it writable"),
    case("sample: --out in a read-only folder", "sample --workdir {run} --out {ro_dir}/s.npz",
         "the folder '{ro_dir}' is read-only"),
    case("fid-stats: --out is read-only", "fid-stats --data mnist5k --out {readonly}",
         "is read-only"),
    case("eval: --json-out not .json", "eval --workdir {run} --ref {tmp}/ref.npz "
         "--json-out {tmp}/e.txt", "the results are written as a .json file"),
    case("eval: --json-out is a folder", "eval --workdir {run} --ref {tmp}/ref.npz "
         "--json-out {dir_json}", "is a folder; give a file name"),
    case("export: --out in a read-only folder", "export --workdir {run} --to safetensors "
         "--out {ro_dir}/e", "the folder '{ro_dir}' is read-only"),
    case("phema: --out is a file", "phema --workdir {snaps} --sigma-rel 0.05 --out {points3}",
         "is a file; give a folder"),
    case("train: empty --workdir", "train --config toy_gmm:smoke --workdir=",
         "--workdir '': give a folder"),
    case("train: --workdir is a file", "train --config toy_gmm:smoke --workdir {points3}",
         "is a file; give a folder"),
    # empty datasets
    case("dataset file of 0 examples", f"train --config toy_gmm:smoke {TOY_NPZ}{{empty_npz}} "
         "--workdir {tmp}/x", "holds no examples ('x' has shape (0, 2))"),
    case("dataset file of 0 bytes", f"train --config toy_gmm:smoke {TOY_NPZ}{{zero_bytes}} "
         "--workdir {tmp}/x", "is empty (0 bytes)"),
    case("empty image folder", "train --config cifar10:smoke --config.dataset.source=image_folder "
         "--config.dataset.path={empty_dir} --workdir {tmp}/x", "holds no .png/.jpg/.jpeg files"),
    case("sample: --num beyond the host's memory", "sample --workdir {run} --num 1000000000000 "
         "--out {tmp}/s.npz", "samples of shape (2,) need about 14901.2 GiB of host memory",
         elide=((r"and [\d.]+ GiB are available; ask for at most \d+",
                 "and … GiB are available; ask for at most …"),)),
    # config files (scm_jax.config.files: used exactly as given; failures in one line)
    case("config path that does not exist", "train --config {tmp}/some/dir/toy_gmm.py "
         "--workdir {tmp}/x", "not found (looked for {tmp}/some/dir/toy_gmm.py)"),
    case("config path that is a folder", "train --config {cfg_folder} --workdir {tmp}/x",
         "is a folder, not a config file"),
    case("config file with a syntax error", "config --config {cfg_syntax}",
         "line 2: the config file failed to load: SyntaxError", subprocess=True),
    case("config file with a missing import", "config --config {cfg_import}",
         "line 1: the config file failed to load: ModuleNotFoundError"),
    case("get_config raises", "config --config {cfg_raises}",
         "line 3: get_config(None) failed: RuntimeError: boom"),
    case("get_config returns None", "config --config {cfg_none}",
         "returned NoneType, not an ml_collections.ConfigDict"),
    # one trainer per workdir (scm_jax.train.lock; the fixture holds the lock)
    case("workdir in use by another trainer", "train --config toy_gmm:smoke --workdir {locked}",
         "wait for it to finish or use another --workdir",
         elide=((r"pid \d+ on host \S+ \(since [^,]+,", "pid … on host … (since …,"),)),
    case("workdir under a file", "train --config toy_gmm:smoke --workdir {points3}/run",
         "is a file, not a folder"),
]  # fmt: skip
_HELD_LOCKS: list = []  # the fixture's lock of {locked}, held while the cases run


def make_fixtures(root: Path) -> dict[str, Path]:
    """Paths the cases name: a trained toy run (class-conditional, 3 classes, 1 step), copies of
    it without its config.json and with every checkpoint truncated, folders whose config.json
    is a toy / an MNIST diffusion run, a safetensors export with its weights file corrupted, a
    pickle, .npz files of NaN and of 3-d points, and the run's config with EMA snapshots at
    steps 1 and 2 (``snaps``) or at step 1 alone (``snap1``); folders named like files
    (``dir_npz``, ``dir_json``), a read-only file and folder, an .npz of 0 examples, a file of
    0 bytes and an empty image folder; config files that fail in four ways and a folder named
    like one; a workdir whose lock this process holds (``locked``)."""
    from scm_jax.config import defaults
    from scm_jax.run.layout import prepare_workdir
    from scm_jax.train.loop import train

    paths = {"tmp": root, "run": root / "run", "nocfg": root / "nocfg",
             "damaged": root / "damaged", "toy_teacher": root / "toy_teacher",
             "nan": root / "nan.npz", "points3": root / "points3.npz", "pickle": root / "a.pkl",
             "corrupt_export": root / "corrupt_export", "snaps": root / "snaps",
             "snap1": root / "snap1", "mnist_teacher": root / "mnist_teacher",
             "dir_npz": root / "dir.npz", "dir_json": root / "dir.json",
             "readonly": root / "readonly.npz", "ro_dir": root / "ro_dir",
             "empty_npz": root / "empty.npz", "zero_bytes": root / "zero.npz",
             "empty_dir": root / "empty_images", "cfg_folder": root / "cfgs" / "toy_gmm.py",
             "cfg_syntax": root / "syntax.py", "cfg_import": root / "imports.py",
             "cfg_raises": root / "raises.py", "cfg_none": root / "none.py",
             "locked": root / "locked"}  # fmt: skip
    cfg = defaults.load_config("toy_gmm:smoke")
    with cfg.unlocked():
        cfg.dataset.source = "synthetic"
        cfg.dataset.num_classes = cfg.model.num_classes = 3
        cfg.total_kimg = cfg.batch_size / 1000
    train(cfg, paths["run"], log=lambda line: None)
    shutil.copytree(paths["run"], paths["nocfg"])
    (paths["nocfg"] / "config.json").unlink()
    shutil.copytree(paths["run"], paths["damaged"])
    for f in (paths["damaged"] / "checkpoints").glob("*/*/d/*"):
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    teacher_cfg = defaults.load_config("toy_gmm:smoke,objective=diffusion")
    prepare_workdir(paths["toy_teacher"], teacher_cfg, has_checkpoint=False)
    mnist_teacher = defaults.load_config("mnist:smoke,objective=diffusion")  # data normalised
    prepare_workdir(paths["mnist_teacher"], mnist_teacher, has_checkpoint=False)
    from scm_jax import cli

    with contextlib.redirect_stdout(io.StringIO()):
        argv = ["export", "--workdir", str(paths["run"]), "--to", "safetensors"]
        assert cli.main([*argv, "--out", str(paths["corrupt_export"])]) == 0
    (paths["corrupt_export"] / "model.safetensors").write_bytes(b"\x00garbage")
    paths["pickle"].write_bytes(b"\x80\x04")  # what EDM2's .pkl snapshots start with
    from scm_jax.networks import build_network
    from scm_jax.run.snapshots import write_snapshot

    net = build_network(cfg.model).init(jax.random.key(0))["net"]
    for name, steps in (("snaps", (1, 2)), ("snap1", (1,))):
        paths[name].mkdir()
        shutil.copy(paths["run"] / "config.json", paths[name])
        for s in steps:
            write_snapshot(paths[name], s, 8, {"power_0.100": net}, {"power_0.100": 0.1})
    np.savez(paths["nan"], x=np.full((16, 2), np.nan, np.float32))
    np.savez(paths["points3"], x=np.zeros((16, 3), np.float32))
    for name in ("dir_npz", "dir_json", "ro_dir", "empty_dir"):
        paths[name].mkdir()
    paths["readonly"].write_bytes(b"an earlier output")
    os.chmod(paths["readonly"], 0o444)  # read-only for root too (scm_jax.files checks the bits)
    os.chmod(paths["ro_dir"], 0o555)
    np.savez(paths["empty_npz"], x=np.zeros((0, 2), np.float32))
    paths["zero_bytes"].write_bytes(b"")
    paths["cfg_folder"].mkdir(parents=True)
    paths["cfg_syntax"].write_text("def get_config(arg):\n    x = 1 +\n")
    paths["cfg_import"].write_text("import not_a_module_xyz\n")
    raises = "def get_config(arg):\n    a = 1\n    raise RuntimeError('boom')\n"
    paths["cfg_raises"].write_text(raises)
    paths["cfg_none"].write_text("def get_config(arg):\n    return None\n")
    from scm_jax.train.lock import WorkdirLock

    command = f"scm-jax train --config toy_gmm:smoke --workdir {paths['locked']}"
    _HELD_LOCKS.append(WorkdirLock(paths["locked"], command=command).acquire())
    return paths


def _format(text: str, paths: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in paths.items()})


def run_case(c: Case, paths: dict[str, Path]) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of one case (in-process or as a subprocess)."""
    argv = [_format(a, paths) for a in c.argv]
    if c.subprocess:
        env = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
        proc = subprocess.run([sys.executable, "-m", "scm_jax", *argv], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        return proc.returncode, proc.stdout, proc.stderr
    from scm_jax import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def message(stderr: str, paths: dict[str, Path], c: Case) -> str:
    """The error as the docs show it: stderr from its ``error:`` line on, with the fixture
    paths as ``{name}``, the repository as ``<repo>`` and ``mask`` matches elided."""
    lines = stderr.strip().splitlines()
    first = next((i for i, ln in enumerate(lines) if "error:" in ln), 0)
    text = "\n".join(lines[first:])
    for name, p in sorted(paths.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(p), f"{{{name}}}")
    text = text.replace(str(REPO), "<repo>")
    for pattern in c.mask:
        text = re.sub(pattern, lambda m: "(…). It is", text)
    for pattern, shown in c.elide:
        text = re.sub(pattern, lambda m, shown=shown: shown, text)
    return text


def table(results: dict[str, tuple[int, str]]) -> str:
    """The markdown table of every case: command, exit status and message."""

    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "<br>")

    rows = ["| # | bad input | command | exit | message |", "|---|---|---|---|---|"]
    for i, c in enumerate(CASES, 1):
        code, msg = results[c.name]
        cmd = "scm-jax " + " ".join(c.argv)
        rows.append(f"| {i} | {c.name} | `{cell(cmd)}` | {code} | {cell(msg)} |")
    return "\n".join(rows)


def run_all(paths: dict[str, Path]) -> dict[str, tuple[int, str, str, str]]:
    """``{name: (status, stdout, stderr, docs message)}`` of every case."""
    out = {}
    for c in CASES:
        code, stdout, stderr = run_case(c, paths)
        out[c.name] = (code, stdout, stderr, message(stderr, paths, c))
    return out


def docs_table() -> str:
    """The generated table as it stands in docs/reliability.md (between the markers)."""
    text = DOCS.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[int, str, str, str]]:
    return run_all(make_fixtures(tmp_path_factory.mktemp("bad_inputs")))


def test_the_cases_are_distinct_and_many():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)
    assert len({c.argv for c in CASES}) == len(CASES)
    assert sum(c.subprocess for c in CASES) >= 3


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input_exits_with_one_clear_message(c, results):
    code, stdout, stderr, msg = results[c.name]
    assert code == c.code, (code, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stdout + stderr, stderr[-3000:]
    assert c.expect in msg, msg
    assert msg.startswith(f"scm-jax {c.argv[0]}: error: ") or msg.startswith("scm-jax: "), msg


def test_docs_table_matches_the_cases(results):
    generated = table({name: (r[0], r[3]) for name, r in results.items()}).splitlines()
    documented = docs_table().splitlines()
    differ = [f"docs: {a}\nnow:  {b}" for a, b in zip(documented, generated, strict=False)
              if a != b]  # fmt: skip
    assert documented == generated, (
        "docs/reliability.md is out of date: run `python tests/bad_inputs_test.py --write-docs`"
        "\n" + "\n".join(differ[:5])
    )


def write_docs() -> None:
    """Run every case in a temporary folder and write the table into docs/reliability.md."""
    jax.config.update("jax_disable_most_optimizations", True)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_all(make_fixtures(Path(tmp)))
    bad = [c.name for c in CASES if res[c.name][0] != c.code or c.expect not in res[c.name][3]
           or "Traceback" in res[c.name][1] + res[c.name][2]]  # fmt: skip
    if bad:
        raise SystemExit(f"cases that do not give their message: {bad}")
    text = DOCS.read_text()
    new = table({name: (r[0], r[3]) for name, r in res.items()})
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOCS.write_text(text[:start] + "\n" + new + "\n" + text[end:])
    print(f"wrote {len(CASES)} cases to {DOCS}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-docs"]:
        raise SystemExit("usage: python tests/bad_inputs_test.py --write-docs")
    write_docs()
