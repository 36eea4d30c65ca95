"""``scm-jax phema``: EDM2 post-hoc EMA of a finished (or running) training run.

  scm-jax phema --workdir runs/in64_sct --sigma-rel 0.05,0.075,0.1 [--at-step N | --at-kimg K]
                [--out DIR]

Reads the run's EMA snapshots (``<workdir>/ema_snapshots/``, written with
``ema.snapshot_every_kimg``; ``scm_jax.run.snapshots``), solves EDM2's least squares for each
requested sigma_rel at the target time (default: the last snapshot; ``scm_jax.phema``) and writes
one export folder per sigma_rel, ``DIR/phema_<sigma_rel>/`` (default ``DIR`` =
``<workdir>/phema``): ``model.safetensors`` + ``config.json`` with ``ema`` =
``phema_<sigma_rel>``, ``step`` the target step and a ``phema`` entry (sigma_rel, the profile's
reconstruction error, each snapshot's coefficient). ``scm_jax.load_sampler``, ``scm-jax sample``,
``eval`` and ``export``, an sCD teacher (``teacher.ema_std`` = that sigma_rel) and ``init_from``
take such a folder like any export. Everything is checked and computed before anything is
written; the folders appear together at the end (temporary names, then renames), an earlier
reconstruction there is replaced.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax.export.command import check_out_dir
from scm_jax.files import check_output_folder, replace_folder, temp_name
from scm_jax.run.exports import export_config, is_export, save_export
from scm_jax.run.snapshots import Snapshot, read_snapshot, snapshot_dir, snapshot_path
from scm_jax.run.snapshots import snapshot_steps as list_steps

SIGMA_REL_MAX = 12**-0.5  # the power-function EMA needs 0 < sigma_rel < 1/sqrt(12)
_GROUP = 8  # snapshot tensors summed at once (memory: this many copies of one tensor)


def phema_name(sigma_rel: float) -> str:
    """The EMA name (and folder name) of a reconstruction: ``'phema_0.050'``."""
    return f"phema_{sigma_rel:.3f}"


def parse_sigma_rel(text: str) -> list[float]:
    """``'0.05,0.1'`` -> [0.05, 0.1] (duplicates of one ``phema_<s:.3f>`` name dropped).

    Raises:
      ValueError: not numbers, or outside (0, 1/sqrt(12)).
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            s = float(part)
        except ValueError:
            raise ValueError(f"--sigma-rel {text!r}: expected numbers like 0.05,0.1") from None
        if not 0 < s < SIGMA_REL_MAX:
            raise ValueError(f"--sigma-rel {part}: sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}) "
                             "(EDM2's power-function EMA; typical 0.01..0.25)")  # fmt: skip
        out.setdefault(phema_name(s), s)
    if not out:
        raise ValueError(f"--sigma-rel {text!r}: give at least one value, e.g. 0.05,0.1")
    return list(out.values())


def load_snapshots(workdir: str | Path) -> tuple[dict[str, Any], list[Snapshot]]:
    """The run's config and its snapshots' headers (ascending steps).

    Raises:
      FileNotFoundError: not a training run. ValueError: an export folder, no snapshots, fewer
        than 2, damaged ones, or snapshots of different batch sizes (each message says how to
        fix it).
    """
    from scm_jax.run.layout import load_run_config

    if is_export(workdir):
        raise ValueError(f"--workdir {str(workdir)!r} is an export folder; post-hoc EMA reads a "
                         "training run's EMA snapshots: give that run's --workdir")  # fmt: skip
    run_cfg = load_run_config(workdir)
    steps = list_steps(workdir)
    if not steps:
        power = tuple(run_cfg.get("ema", {}).get("power_std", ()))
        hint = "" if power else (
            "; this run has no power-function EMA either: add --config.ema.power_std=0.05,0.1"
        )  # fmt: skip
        raise ValueError(
            f"{str(workdir)!r} has no EMA snapshots (nothing in {snapshot_dir(workdir)}): "
            "post-hoc EMA needs a run trained with --config.ema.snapshot_every_kimg=K (e.g. "
            f"total_kimg / 50: its power EMAs are written every K kimg){hint}"
        )
    if len(steps) < 2:
        raise ValueError(
            f"{str(workdir)!r} has 1 EMA snapshot (step {steps[0]}); the least-squares "
            "reconstruction needs at least 2: train longer, or with a smaller "
            "ema.snapshot_every_kimg"
        )
    snaps = [read_snapshot(snapshot_path(workdir, s)) for s in steps]
    batches = sorted({s.batch_size for s in snaps})
    if len(batches) > 1:
        raise ValueError(f"the snapshots in {snapshot_dir(workdir)} have batch sizes {batches}; "
                         "they must come from one run")  # fmt: skip
    return run_cfg, snaps


def target_step(snaps: Sequence[Snapshot], at_step: int | None, at_kimg: float | None) -> int:
    """The step to reconstruct at: ``at_step``, ``at_kimg`` (rounded to a step) or the last
    snapshot's.

    Raises:
      ValueError: before step 1 or after the last snapshot (nothing is known about later
        parameters).
    """
    last = snaps[-1].step
    if at_kimg is not None:
        at_step = round(at_kimg * 1000 / snaps[-1].batch_size)
    step = last if at_step is None else int(at_step)
    if not 1 <= step <= last:
        what = f"--at-step {step}"
        if at_kimg is not None:
            what = f"--at-kimg {at_kimg:g} (step {step})"
        raise ValueError(f"{what}: must lie between step 1 and the last snapshot's step {last} "
                         f"({last * snaps[-1].batch_size / 1000:g} kimg)")  # fmt: skip
    return step


def _combine(
    snaps: Sequence[Snapshot], entries: Sequence[tuple[int, str]], coefficients: np.ndarray
) -> list[dict[str, np.ndarray]]:  # fmt: skip
    """Per target j: ``{tensor name: sum_e coefficients[e, j] snapshot tensor e}`` (float64
    accumulation, the snapshot's dtype), reading each tensor of each file once."""
    from safetensors import safe_open

    from scm_jax.phema import weighted_sum

    with contextlib.ExitStack() as stack:
        files = []
        for s in snaps:
            try:
                files.append(stack.enter_context(safe_open(str(s.path), framework="np")))
            except Exception as e:
                raise ValueError(
                    f"EMA snapshot {str(s.path)!r} is damaged ({e}); move it out "
                    f"of {s.path.parent} to reconstruct from the others"
                ) from None
        keys = [set(f.keys()) for f in files]
        names = sorted(k.split("/", 1)[1] for k in keys[0] if k.startswith(f"{entries[0][1]}/"))
        for i, ema in entries:
            want = {f"{ema}/{n}" for n in names}
            if not want <= keys[i]:
                missing = sorted(want - keys[i])[0]
                raise ValueError(f"EMA snapshot {str(snaps[i].path)!r} lacks tensors of {ema} "
                                 f"(e.g. {missing}); it is not of this run")  # fmt: skip
        out: list[dict[str, np.ndarray]] = [{} for _ in range(coefficients.shape[1])]
        for name in names:
            acc: list[Any] = [0.0] * len(out)
            dtype = None
            for g in range(0, len(entries), _GROUP):
                group = entries[g : g + _GROUP]
                arrays = [files[i].get_tensor(f"{ema}/{name}") for i, ema in group]
                dtype = arrays[0].dtype if dtype is None else dtype
                for j in range(len(out)):
                    acc[j] = acc[j] + weighted_sum(
                        arrays, coefficients[g : g + len(group), j], np.float64
                    )
            for j in range(len(out)):
                out[j][name] = acc[j].astype(dtype)
    return out


def reconstruct(
    workdir: str | Path, sigma_rel: Sequence[float], *, at_step: int | None = None,
    at_kimg: float | None = None, out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> list[Path]:  # fmt: skip
    """Write the post-hoc EMA of each ``sigma_rel`` as an export folder (see the module
    docstring); returns the folders.

    Raises:
      FileNotFoundError / ValueError: not a run, no or too few snapshots, a target outside the
        snapshots, an output folder holding other files; nothing is written then.
    """
    from scm_jax.networks import build_network
    from scm_jax.phema import solve_coefficients
    from scm_jax.run.state_dict import from_state_dict

    workdir = Path(workdir)
    sigma_rel = [float(s) for s in sigma_rel]
    for s in sigma_rel:
        if not 0 < s < SIGMA_REL_MAX:
            raise ValueError(f"sigma_rel {s} must be in (0, {SIGMA_REL_MAX:.4f})")
    run_cfg, snaps = load_snapshots(workdir)
    step = target_step(snaps, at_step, at_kimg)
    batch = snaps[-1].batch_size
    out = Path(out) if out is not None else workdir / "phema"
    dirs = [out / phema_name(s) for s in sigma_rel]
    for d in dirs:
        check_out_dir(d)
    entries = [(i, name) for i, s in enumerate(snaps) for name in sorted(s.emas)]
    profiles = sorted({f"{name} (sigma_rel {snaps[i].emas[name]:g})" for i, name in entries})
    log(f"phema: {len(snaps)} snapshots in {snapshot_dir(workdir)} (steps {snaps[0].step}.."
        f"{snaps[-1].step}; {', '.join(profiles)}); reconstructing at step {step} "
        f"({step * batch / 1000:g} kimg)")  # fmt: skip
    sol = solve_coefficients([snaps[i].emas[n] for i, n in entries],
                             [snaps[i].step for i, _ in entries], sigma_rel,
                             [step] * len(sigma_rel))  # fmt: skip
    for j, s in enumerate(sigma_rel):
        x = sol.coefficients[:, j]
        poor = "; poorly spanned by the snapshots' profiles" if sol.error[j] > 0.1 else ""
        log(f"  sigma_rel {s:.3f}: profile error {100 * sol.error[j]:.2f}%, coefficients "
            f"{x.min():+.3f}..{x.max():+.3f}{poor}")  # fmt: skip
    abstract = build_network(run_cfg["model"]).abstract_params()["net"]
    states = _combine(snaps, entries, sol.coefficients)
    params = [from_state_dict(st, abstract, where=str(snapshot_dir(workdir))) for st in states]

    temps: list[Path] = []
    try:
        for d, s, p, j in zip(dirs, sigma_rel, params, range(len(dirs)), strict=True):
            cfg = export_config(run_cfg, ema=phema_name(s), step=step,
                                source=str(workdir.resolve()))  # fmt: skip
            cfg["phema"] = {
                "sigma_rel": s, "step": step, "nimg": step * batch,
                "profile_error": float(sol.error[j]),
                "snapshots": [{"step": snaps[i].step, "ema": name,
                               "coefficient": float(sol.coefficients[e, j])}
                              for e, (i, name) in enumerate(entries)],
            }  # fmt: skip
            tmp = temp_name(d)  # a hidden folder beside d, swapped in once all are written
            temps.append(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            save_export(tmp, p, cfg)
        for d, tmp in zip(dirs, temps, strict=True):  # the earlier export (if any) replaced
            replace_folder(tmp, d)
    finally:
        for tmp in temps:
            shutil.rmtree(tmp, ignore_errors=True)
    for d in dirs:
        log(f"wrote {d} (EMA {d.name}, step {step})")
    return dirs


def phema_main(argv: Sequence[str]) -> int:
    """``scm-jax phema``: EDM2 post-hoc EMA: any sigma_rel from a run's EMA snapshots."""
    parser = argparse.ArgumentParser(prog="scm-jax phema", description=phema_main.__doc__)
    parser.add_argument("--workdir", required=True, help="a training run with EMA snapshots")
    parser.add_argument("--sigma-rel", required=True,
                        help="relative EMA widths to reconstruct, e.g. 0.05,0.1")  # fmt: skip
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--at-step", type=int, help="reconstruct at this step (default: the last "
                      "snapshot's)")  # fmt: skip
    when.add_argument("--at-kimg", type=float, help="reconstruct at this many kimg")
    parser.add_argument("--out", help="folder of the phema_<sigma_rel>/ exports "
                        "(default: WORKDIR/phema)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.out is not None:
        check_output_folder(args.out)
    sigma_rel = parse_sigma_rel(args.sigma_rel)
    dirs = reconstruct(args.workdir, sigma_rel, at_step=args.at_step, at_kimg=args.at_kimg,
                       out=args.out)  # fmt: skip
    print(f"sample with: scm-jax sample --workdir {dirs[0]} --out samples.png; each folder "
          "also serves as --config.teacher.workdir / --config.init_from")  # fmt: skip
    return 0
