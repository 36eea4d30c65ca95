"""Console progress with a fake clock: compile time, throughput, ETA, durations."""

from __future__ import annotations

import os

import pytest

from scm_jax.console import emit, format_duration
from scm_jax.train.progress import Progress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize(
    "seconds, text",
    [
        (0.04, "0.0s"),
        (12.34, "12.3s"),
        (59.94, "59.9s"),
        (59.96, "1m00s"),
        (312, "5m12s"),
        (3599.6, "1h00m"),
        (3780, "1h03m"),
        (90000, "1d01h"),
        (-1, "?"),
        (float("nan"), "?"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_lines_and_measurements():
    clock, lines = FakeClock(), []
    p = Progress(5000, batch_size=128, print_fn=lines.append, clock=clock)

    clock.t += 12.3  # compilation + first step
    line = p.update(1, {"loss": 0.5, "grad_norm": 2.0})
    assert line == lines[-1]
    assert line.startswith("step 1/5000 (0.0%)  kimg 0.1  loss 0.5  grad 2")
    assert "first step (incl. compile) 12.3s" in line
    assert "img/s" not in line and "ETA" not in line
    assert p.images_per_s is None and p.step_time_s is None
    assert p.timing_scalars() == {"compile_time_s": pytest.approx(12.3)}

    clock.t += 1199 * 0.08
    line = p.update(1200, {"loss": 0.1234, "grad_norm": 1.23, "other": 9.0})
    assert line == (
        "step 1200/5000 (24.0%)  kimg 153.6  loss 0.1234  grad 1.23  1600 img/s  0.08 s/step"
        "  ETA 5m04s"
    )
    assert p.step_time_s == pytest.approx(0.08)
    assert p.images_per_s == pytest.approx(1600)
    assert p.eta_s == pytest.approx(3800 * 0.08)
    assert p.timing_scalars() == pytest.approx({"images_per_s": 1600, "step_time_s": 0.08})

    # ETA follows a moving average: one interval at 0.16 s/step -> smoothed 0.12 s/step.
    clock.t += 800 * 0.16
    p.update(2000, {})
    assert p.step_time_s == pytest.approx(0.16)
    assert p.eta_s == pytest.approx(3000 * 0.12)
    assert "compile_time_s" not in p.timing_scalars()


def test_resume_restart_timer_and_quiet():
    clock = FakeClock()
    p = Progress(100, start_step=40, batch_size=10, print_fn=None, clock=clock)
    clock.t += 5.0
    assert "first 10 steps (incl. compile) 5.0s" in p.update(50)
    clock.t += 30.0  # an evaluation that should not count
    p.restart_timer(50)
    clock.t += 2.0
    line = p.update(60)
    assert p.step_time_s == pytest.approx(0.2) and p.images_per_s == pytest.approx(50)
    assert line == ("step 60/100 (60.0%)  kimg 0.6  50 img/s  0.2 s/step  ETA 8.0s")
    clock.t += 1.0
    p.update(60)  # no progress: no rate, no crash
    assert p.images_per_s is None and p.timing_scalars() == {}
    with pytest.raises(ValueError):
        Progress(0, batch_size=1)


def test_emit_survives_a_reader_that_went_away():
    """A closed pipe (``| tee`` gone): the first failed write points the stream at /dev/null,
    later lines and the final flush succeed silently."""
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    try:
        emit("first", stream)
        assert os.read(read_end, 100) == b"first\n"
        os.close(read_end)  # the reader goes away
        emit("second", stream)  # BrokenPipeError inside; nothing raised
        emit("third", stream)
        stream.flush()
        assert os.readlink(f"/proc/self/fd/{stream.fileno()}") == os.devnull
    finally:
        stream.close()
