"""Markdown tables of benchmark result files (the tables of docs/performance.md).

  python benchmarks/report.py                                   # every suite file in results/
  python benchmarks/report.py benchmarks/results/train_step_gpu.json ...

Each file names its benchmark (``"benchmark"``); the table comes from that script's ``table``
function, under a heading with the device, jax version, date, load average and command.
Suite scripts: ``jvp_overhead``, ``train_step``, ``sampling`` and the PyTorch peer
``peer_torch`` (each module defines ``table(rows) -> str``).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITE = ("jvp_overhead", "train_step", "sampling", "peer_torch")


def report(path: Path) -> str:
    """The heading and table(s) of one result file."""
    data = json.loads(path.read_text())
    name = data.get("benchmark")
    if name not in SUITE:
        raise ValueError(f"{path}: not a suite result (benchmark {name!r}; expected one of "
                         f"{', '.join(SUITE)})")  # fmt: skip
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    module = importlib.import_module(name)
    meta = data["meta"]
    where = (f"{meta['devices']} x {meta['device_kind']} ({meta['platform']}), jax "
             f"{meta['jax']}, {meta['time_utc'][:10]}")  # fmt: skip
    if meta["platform"] == "cpu":
        where += (f"; {meta['cpu_count']} CPU cores, load average {meta['load_average']} at the "
                  f"start, {meta.get('load_average_end')} at the end")  # fmt: skip
    lines = [
        f"### {name}: {where}",
        "",
        f"`{data['command']}` -> `{path.name}`"
        + ("" if data.get("complete") else " (incomplete: stopped before the end)"),
        "",
    ]
    if name == "sampling":
        lines.append(module.table(data["rows"], data.get("speedups", [])))
    else:
        lines.append(module.table(data["rows"]))
    missed = [r for r in data["rows"] if r.get("status") not in ("ok", None)]
    if missed:
        lines += ["", "Not measured: " + "; ".join(_describe(r) for r in missed)]
    return "\n".join(lines)


KEYS = ("size", "objective", "kind", "steps", "dtype", "batch", "per_device", "remat")


def _describe(row: dict) -> str:
    what = " ".join(f"{k}={row[k]}" for k in KEYS if k in row)
    why = row["status"] + (f": {row['reason']}" if row.get("reason") else "")
    return f"{what} ({why})"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(p) for p in args] or sorted(
        p
        for p in (HERE / "results").glob("*.json")
        if json.loads(p.read_text()).get("benchmark") in SUITE
    )
    print("\n\n".join(report(p) for p in paths))


if __name__ == "__main__":
    main()
