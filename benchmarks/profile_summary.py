"""Where the device time goes: a summary of ``jax.profiler`` traces written by ``--profile``.

  python benchmarks/profile_summary.py DIR [--top 25] [--json FILE]

Reads every ``*.trace.json.gz`` (Chrome trace format, written beside the XProf ``.xplane.pb``)
under DIR and, per trace, sums the durations of the device's events (XLA's operations, where
the trace names them with ``hlo_op``): by category (convolution, matrix product, fused
elementwise / reduction, copy / transpose, collective, other; from the kernel or XLA
operation name), and the ``--top`` operations. It also reports the device's busy
time (union of its events) over the trace's span on it: a low share means the device waits on
the host (launches, syncs). GPU traces have ``/device:GPU:N`` processes; a CPU trace has only
host threads, summarised the same way (XLA's CPU work runs on them). The full interactive view:
``xprof --logdir DIR`` (``pip install xprof``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

CATEGORIES = (  # first match wins; matched against the operation's and kernel's names
    ("collective", r"all-reduce|all-gather|reduce-scatter|all-to-all|nccl|collective"),
    ("convolution", r"conv(?!ert)|fprop|dgrad|wgrad|implicit_gemm|cudnn"),
    ("matmul", r"gemm|dot|matmul|cublas|cutlass|triton_gemm|wgmma"),
    ("copy/transpose", r"copy|memcpy|memset|transpose|dynamic-update-slice"),
    ("XNNPACK (CPU: conv / matmul)", r"ynn_|xnn"),
    ("fusion/elementwise", r"fusion|loop_|reduce|broadcast|add|multiply|select|convert|exp"),
)


def _category(text: str) -> str:
    low = text.lower()
    for name, pattern in CATEGORIES:
        if re.search(pattern, low):
            return name
    return "other"


def _busy(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Summary of one trace: ``device`` (process names used), ``span_us``, ``busy_us``,
    ``event_us`` (sum of event durations), ``categories`` {name: us}, ``top`` [(op, us, n)]."""
    trace = json.loads(gzip.open(path).read())
    events = trace.get("traceEvents", [])
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    device = {p for p, n in names.items() if n.startswith("/device:")}
    pids = device or set(names)  # a CPU trace: its host threads
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    cats: dict[str, float] = defaultdict(float)
    intervals = []
    timed = [e for e in events if e.get("ph") == "X" and e.get("pid") in pids and "dur" in e]
    xla_ops = [e for e in timed if "hlo_op" in (e.get("args") or {})]
    for e in xla_ops or timed:  # XLA's operations where the trace names them (not runtime)
        if str(e.get("name", "")).startswith("$"):  # Python frames
            continue
        args = e.get("args", {}) or {}
        op = str(args.get("hlo_op") or args.get("long_name") or e.get("name", "?"))
        text = f"{op} {e.get('name', '')} {args.get('long_name', '')}"
        dur = float(e["dur"])
        by_op[op][0] += dur
        by_op[op][1] += 1
        cats[_category(text)] += dur
        intervals.append((float(e["ts"]), float(e["ts"]) + dur))
    span = (max(b for _, b in intervals) - min(a for a, _ in intervals)) if intervals else 0.0
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "trace": str(path),
        "device": sorted(names[p] for p in pids),
        "span_us": span,
        "busy_us": _busy(intervals),
        "event_us": sum(cats.values()),
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top": [(op, us, int(n)) for op, (us, n) in ranked],
    }


def format_summary(s: dict[str, Any]) -> str:
    """Plain-text report of :func:`summarize`'s result."""
    total = s["event_us"] or 1.0
    lines = [
        f"{s['trace']}  ({', '.join(s['device'])})",
        f"  span {s['span_us'] / 1e3:.2f} ms, busy {s['busy_us'] / 1e3:.2f} ms "
        f"({s['busy_us'] / max(s['span_us'], 1e-9):.0%} of the span)",
        "  by category: " + ", ".join(f"{k} {v / total:.1%}" for k, v in s["categories"].items()),
        "  top operations (ms, share, count):",
    ]
    for op, us, n in s["top"]:
        lines.append(f"    {us / 1e3:9.3f}  {us / total:6.1%}  {n:5d}  {op[:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", help="a --profile folder (searched recursively)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", default=None, help="also write the summaries as JSON")
    args = parser.parse_args(argv)
    paths = sorted(Path(args.dir).rglob("*.trace.json.gz"))
    if not paths:
        raise SystemExit(f"no *.trace.json.gz under {args.dir}")
    summaries = [summarize(p, args.top) for p in paths]
    print("\n\n".join(format_summary(s) for s in summaries))
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1) + "\n")


if __name__ == "__main__":
    main()
