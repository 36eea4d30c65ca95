"""Metric writers: JSON lines round trip and resume, TensorBoard event files, fan-out."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import numpy as np
import pytest

from scm_jax.train import writers


def _events(logdir):
    """Decode every tensorboardX event (TFRecord framing: len u64, crc u32, data, crc u32)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n]))
            pos += 12 + n + 4
    return events


def test_jsonl_round_trip(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with writers.JsonlWriter(path) as w:
        w.write_scalars(10, {"loss": 0.5, "lr": np.float32(1e-3), "n": np.int64(3)})
        w.write_scalars(20, {"loss": float("nan"), "grad_norm": np.inf, "x": -np.inf})
        w.write_images(20, {"grid": np.zeros((4, 4, 3), np.uint8)})  # not written to JSON
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:  # strict JSON: no NaN / Infinity literals
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    recs = writers.read_metrics(path)
    assert recs[0]["step"] == 10 and recs[0]["loss"] == 0.5 and recs[0]["n"] == 3
    assert recs[0]["lr"] == pytest.approx(1e-3)
    assert isinstance(recs[0]["time"], float)
    assert math.isnan(recs[1]["loss"]) and recs[1]["grad_norm"] == math.inf
    assert recs[1]["x"] == -math.inf
    assert json.loads(lines[1])["loss"] == "nan"
    with pytest.raises(ValueError, match="reserved"), writers.JsonlWriter(path) as w:
        w.write_scalars(1, {"step": 1.0})


def test_jsonl_appends_on_resume_and_survives_torn_line(tmp_path):
    with writers.JsonlWriter(tmp_path / "metrics.jsonl") as w:
        w.write_scalars(1, {"loss": 1.0})
    with writers.JsonlWriter(tmp_path / "metrics.jsonl") as w:
        w.write_scalars(2, {"loss": 2.0})
    assert [r["step"] for r in writers.read_metrics(tmp_path)] == [1, 2]
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a crash in the middle of a line
        f.write('{"step": 3, "lo')
    with writers.JsonlWriter(tmp_path / "metrics.jsonl") as w:
        w.write_scalars(4, {"loss": 4.0})
    with pytest.warns(UserWarning, match="1 undecodable"):
        recs = writers.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 4]


def test_jsonl_flushes_every_line(tmp_path):
    w = writers.JsonlWriter(tmp_path / "m.jsonl")
    w.write_scalars(5, {"loss": 0.25})
    assert writers.read_metrics(tmp_path / "m.jsonl")[0]["loss"] == 0.25  # before close
    w.close()
    w.close()


def test_tensorboard_writer(tmp_path):
    with writers.TensorBoardWriter(tmp_path / "tb") as w:
        w.write_scalars(7, {"loss": 0.125, "loss/t_bin0": 2.0})
        gray, rgb = np.zeros((5, 6, 1), np.uint8), np.full((5, 6, 3), 9, np.uint8)
        w.write_images(7, {"gray": gray, "rgb": rgb})
        w.write_text(7, {"config": "lr: 1e-3"})
        with pytest.raises(ValueError, match="uint8"):
            w.write_images(7, {"bad": np.zeros((5, 6, 3), np.float32)})
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert files and files[0].stat().st_size > 0
    values = {}
    for ev in _events(tmp_path / "tb"):
        for v in ev.summary.value:
            values[v.tag] = (ev.step, v)
    assert values["loss"][0] == 7 and values["loss"][1].simple_value == 0.125
    assert values["loss/t_bin0"][1].simple_value == 2.0
    img = values["gray"][1].image
    assert (img.height, img.width) == (5, 6)
    assert img.encoded_image_string.startswith(b"\x89PNG")
    assert any(tag.startswith("config") for tag in values)


def test_multi_writer_and_create_writers(tmp_path):
    class Recorder(writers.Writer):
        def __init__(self):
            self.calls = []

        def write_scalars(self, step, scalars):
            self.calls.append(("scalars", step, dict(scalars)))

        def close(self):
            self.calls.append(("close",))

    a, b = Recorder(), Recorder()
    with writers.MultiWriter([a, b]) as m:
        m.write_scalars(3, {"loss": 1.0})
        m.write_images(3, {"x": np.zeros((2, 2, 3), np.uint8)})
        m.flush()
    assert a.calls == b.calls == [("scalars", 3, {"loss": 1.0}), ("close",)]

    with writers.create_writers(tmp_path, tensorboard=True) as w:
        w.write_scalars(1, {"loss": 1.5})
    assert writers.read_metrics(tmp_path / writers.METRICS_FILE)[0]["loss"] == 1.5
    assert list((tmp_path / writers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))

    with writers.create_writers(tmp_path / "other", is_main_process=False) as w:
        w.write_scalars(1, {"loss": 1.5})
        assert w.writers == []
    assert not (tmp_path / "other").exists()


def test_import_is_cheap():
    code = "import sys, scm_jax.train.writers; print('tensorboardX' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
