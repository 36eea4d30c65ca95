"""The XXL plan: memory per device of sCD-XXL on ImageNet-512 (student, optimizer, two EMAs and the
teacher) at global batch 2048, and the micro-batch counts that fit 80 GB and 40 GB per device.

  python benchmarks/xxl_plan.py state        # exact state bytes per device for the planned meshes
  python benchmarks/xxl_plan.py compile --devices 8 --mesh fsdp=8 --micro-batches 128 \\
      [--size xxl] [--batch 2048] [--remat none] [--topology v5p-64] [--out FILE]
                                             # compile the real train step, record its memory
  python benchmarks/xxl_plan.py merge FILE...  # add `compile --out` records made elsewhere
  python benchmarks/xxl_plan.py plan         # fit the measurements, choose micro-batch counts
  python benchmarks/xxl_plan.py note KEY TEXT  # record what could not be measured, and why

Everything lands in ``benchmarks/results/xxl_plan.json``: ``state`` (per mesh, exact, from the
sharding rules), ``compiled`` (one record per compilation: platform, mesh, micro-batch,
``compiled.memory_analysis()`` per device), ``fits``, ``checks``, ``plan``, ``notes``. The plan's
memory model per device is

  total(b) = S + T + A b,

S the exact state per device of the target mesh, b the per-device micro-batch, A (activation
bytes per sample) and S + T a least-squares line through compilations of one platform, size and
mesh that differ only in b (each point's residual is kept). On another mesh T comes from one
compilation on that mesh (its total minus S and A b) where there is one, else it is scaled by
the parameter bytes per device (an extrapolation; ``checks`` shows how far off such predictions
were against the compilations). A fit of a smaller size is carried to XXL (A x the width ratio)
only where no XXL fit exists.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results" / "xxl_plan.json"
CONFIG = "imagenet512:size={size},objective=scd"
BATCH = 2048
MESHES = {  # name -> (devices, mesh axis sizes)
    "8 GPUs, fsdp=8": (8, {"data": 1, "fsdp": 8, "tensor": 1}),
    "8 GPUs, data=2 x fsdp=4": (8, {"data": 2, "fsdp": 4, "tensor": 1}),
    "64 GPUs, data=8 x fsdp=8": (64, {"data": 8, "fsdp": 8, "tensor": 1}),
}
BUDGETS = {"80GB": 80e9, "40GB": 40e9}


def _load() -> dict[str, Any]:
    return json.loads(OUT.read_text()) if OUT.exists() else {"state": {}, "compiled": []}


def _save(results: dict[str, Any]) -> None:
    import jax

    results["meta"] = {
        "script": "benchmarks/xxl_plan.py",
        "config": CONFIG.format(size="xxl") + f", global batch {BATCH}",
        "jax (this run)": jax.__version__,
        "python": platform.python_version(),
        "budgets": "80 GB = 80e9 and 40 GB = 40e9 bytes per device",
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


def _config(size: str, batch: int, micro: int, remat: str) -> Any:
    from scm_jax.config import defaults
    from scm_jax.train.build import with_overrides

    cfg = defaults.load_config(CONFIG.format(size=size))
    return with_overrides(cfg, batch_size=batch, micro_batches=micro, remat=remat)


def cmd_state(args: argparse.Namespace) -> None:
    """Exact per-device state bytes of sCD-XXL for each planned mesh (abstract shapes only)."""
    from scm_jax.info import model_info

    results = _load()
    cfg = _config("xxl", BATCH, 1, "none")
    for name, (devices, mesh) in MESHES.items():
        t0 = time.perf_counter()
        info = model_info(cfg, devices, mesh=mesh, flops=False)
        results["state"][name] = {
            "devices": devices, "mesh": info["mesh"], "params": info["params"],
            "params_teacher": info["params_teacher"], "state_bytes": info["state_bytes"],
            "state_bytes_breakdown": info["state_bytes_breakdown"],
            "state_bytes_per_device": info["state_bytes_per_device"],
            "state_bytes_per_device_breakdown": info["state_bytes_per_device_breakdown"],
            "per_device_batch": info["per_device_batch"],
        }  # fmt: skip
        gib = info["state_bytes_per_device"] / 2**30
        print(f"{name}: {gib:.2f} GiB per device ({time.perf_counter() - t0:.1f} s)")
    _save(results)


def cmd_compile(args: argparse.Namespace) -> None:
    """Compile the real train step once and record ``memory_analysis()`` per device."""
    if not args.topology and args.devices > 1 and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}"
    if args.topology:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from scm_jax.cli import parse_mesh
    from scm_jax.info import compile_target, compiled_info, model_info

    cfg = _config(args.size, args.batch, args.micro_batches, args.remat)
    info = model_info(cfg, args.devices, mesh=parse_mesh(args.mesh), flops=False)
    compiled = compiled_info(cfg, compile_target(info["mesh"], args.topology))
    record = {
        "size": args.size, "batch": args.batch, "mesh": info["mesh"],
        "micro_batches": args.micro_batches, "per_device_micro_batch":
        info["per_device_micro_batch"], "remat": args.remat,
        "state_bytes_per_device": info["state_bytes_per_device"],
        "params_bytes_per_device": info["state_bytes_per_device_breakdown"]["params"],
        "compiled": compiled, "jax": jax.__version__, "host_cpus": os.cpu_count(),
    }  # fmt: skip
    print(json.dumps(record, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps([record], indent=2) + "\n")
    else:
        _merge([record])


def _key(r: dict[str, Any]) -> tuple:
    c = r["compiled"]
    return (c["platform"], c.get("topology", ""), r["size"], r["batch"],
            tuple(sorted(r["mesh"].items())), r["micro_batches"], r["remat"])  # fmt: skip


def _merge(records: list[dict[str, Any]]) -> None:
    results = _load()
    keep = {_key(r): r for r in results.get("compiled", [])}
    keep.update({_key(r): r for r in records})
    results["compiled"] = list(keep.values())
    _save(results)


def cmd_merge(args: argparse.Namespace) -> None:
    """Add the records of ``compile --out FILE`` runs (e.g. from a GPU machine)."""
    _merge([r for f in args.files for r in json.loads(Path(f).read_text())])


def _fits(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Least-squares lines total = intercept + A b over records that differ only in b, with each
    point's residual (how far XLA's buffer assignment is from linear in the micro-batch)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results["compiled"]:
        k = _key(r)
        groups.setdefault((k[0], k[1], k[2], k[4], k[6]), []).append(r)
    fits = []
    for (_, _, size, mesh, remat), rs in groups.items():
        pts = sorted({r["per_device_micro_batch"]: r for r in rs}.items())
        if len(pts) < 2:
            continue
        bs = [b for b, _ in pts]
        ys = [r["compiled"]["total_bytes"] for _, r in pts]
        mb, my = sum(bs) / len(bs), sum(ys) / len(ys)
        slope = sum((b - mb) * (y - my) for b, y in zip(bs, ys, strict=True)) / sum(
            (b - mb) ** 2 for b in bs
        )
        intercept = my - slope * mb
        r0 = pts[0][1]
        residuals = [round(y - intercept - slope * b) for b, y in zip(bs, ys, strict=True)]
        fits.append({
            "platform": _platform(r0), "device_kind":
            r0["compiled"]["device_kind"], "size": size, "mesh": dict(mesh), "remat": remat,
            "micro_batches": bs, "total_bytes": ys,
            "residual_bytes": residuals,
            "activation_bytes_per_sample": slope,
            "fixed_temp_bytes": intercept - r0["state_bytes_per_device"],
            "params_bytes_per_device": r0["params_bytes_per_device"],
        })  # fmt: skip
    return fits


def _platform(r: dict[str, Any]) -> str:
    c = r["compiled"]
    return c["platform"] + (f" {c['topology']}" if "topology" in c else "")


def _predict(
    fit: dict[str, Any], st: dict[str, Any], b: float, anchor: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A fit carried to sCD-XXL on the mesh of ``st`` at per-device micro-batch ``b``.

    Activation bytes per sample scale with the width (EDM2 sizes differ only in
    model_channels: every activation is (samples, H, W, c x mult), attention heads c / 64).
    The fixed temporaries: from ``anchor`` (an XXL compilation on the target mesh itself: its
    total minus the fit's activations), else scaled with the parameter bytes per device.
    """
    from scm_jax.networks import EDM2_CHANNELS

    width = EDM2_CHANNELS["xxl"] / EDM2_CHANNELS[fit["size"]]
    act = fit["activation_bytes_per_sample"] * width
    if anchor is not None:
        temps = (
            anchor["compiled"]["total_bytes"] - anchor["state_bytes_per_device"]
            - act * anchor["per_device_micro_batch"]
        )  # fmt: skip
    else:
        params = st["state_bytes_per_device_breakdown"]["params"]
        temps = fit["fixed_temp_bytes"] * params / fit["params_bytes_per_device"]
    return {
        "activation_bytes_per_sample": round(act),
        "fixed_bytes": round(st["state_bytes_per_device"] + temps),
        "total_bytes": round(st["state_bytes_per_device"] + temps + act * b),
    }


def cmd_plan(args: argparse.Namespace) -> None:
    """Fit each platform's compilations, check the fit against the XXL compilations, and give
    each mesh the fewest micro-batches whose memory fits 80 GB and 40 GB."""
    results = _load()
    fits = _fits(results)
    checks, plan = [], []
    for fit in fits:
        for r in results["compiled"]:  # single XXL compilations: predicted vs compiled
            if r["size"] != "xxl" or _platform(r) != fit["platform"]:
                continue
            c = r["compiled"]
            if r["remat"] != fit["remat"] or (fit["size"], fit["mesh"]) == ("xxl", r["mesh"]):
                continue  # another policy, or a point of the fit itself (see its residuals)
            params = {"params": r["params_bytes_per_device"]}
            st = {"state_bytes_per_device": r["state_bytes_per_device"],
                  "state_bytes_per_device_breakdown": params}  # fmt: skip
            pred = _predict(fit, st, r["per_device_micro_batch"])["total_bytes"]
            checks.append({
                "fit": f"{fit['platform']} size {fit['size']} mesh {fit['mesh']}",
                "xxl_mesh": r["mesh"], "per_device_micro_batch": r["per_device_micro_batch"],
                "predicted_bytes": pred, "compiled_bytes": c["total_bytes"],
                "error": round(pred / c["total_bytes"] - 1, 4),
            })  # fmt: skip
            print("check", json.dumps(checks[-1]))
        direct = {(f["platform"], f["remat"]) for f in fits if f["size"] == "xxl"}
        if fit["size"] != "xxl" and (fit["platform"], fit["remat"]) in direct:
            continue  # plan from the XXL compilations themselves where there are some
        for name, st in results["state"].items():
            per_dev = BATCH // (st["mesh"]["data"] * st["mesh"]["fsdp"])
            ks = [k for k in range(1, per_dev + 1) if per_dev % k == 0]
            anchor = None  # an XXL compilation on this very mesh (same platform and remat)
            if st["mesh"] != fit["mesh"]:
                anchor = next((r for r in results["compiled"] if r["size"] == "xxl"
                               and r["mesh"] == st["mesh"] and r["remat"] == fit["remat"]
                               and _platform(r) == fit["platform"]), None)  # fmt: skip
            row = {
                "mesh": name, "from": f"{fit['platform']} ({fit['device_kind']}) size "
                f"{fit['size']} mesh {fit['mesh']} remat {fit['remat']}, micro-batches "
                f"{fit['micro_batches']}", "extrapolated": [
                    *(["activations and temporaries scaled from size " + fit["size"]]
                      if fit["size"] != "xxl" else []),
                    *([f"parameter-sized temporaries scaled from mesh {fit['mesh']}"]
                      if fit["mesh"] != st["mesh"] and anchor is None else []),
                    *([f"temporaries from one compilation on this mesh (micro-batch "
                       f"{anchor['per_device_micro_batch']}), activations from the fit"]
                      if anchor is not None else []),
                ],
                "per_device_batch": per_dev,
                "state_bytes_per_device": st["state_bytes_per_device"],
                **{k: v for k, v in _predict(fit, st, 0, anchor).items() if k != "total_bytes"},
            }  # fmt: skip
            for label, budget in BUDGETS.items():
                fit_k = [_predict(fit, st, per_dev / k, anchor)["total_bytes"] for k in ks]
                ok = [k for k, m in zip(ks, fit_k, strict=True) if m <= budget]
                row[f"micro_batches_{label}"] = ok[0] if ok else None
                row[f"bytes_per_device_{label}"] = (
                    _predict(fit, st, per_dev / ok[0], anchor)["total_bytes"] if ok else None
                )
            plan.append(row)
            print("plan", json.dumps(row))
    results.update(fits=fits, checks=checks, plan=plan)
    _save(results)


def cmd_note(args: argparse.Namespace) -> None:
    """Record what could not be measured (a compilation stopped by a time limit, say)."""
    results = _load()
    results.setdefault("notes", {})[args.key] = args.text
    _save(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("state")
    c = sub.add_parser("compile")
    c.add_argument("--size", default="xxl")
    c.add_argument("--devices", type=int, default=8)
    c.add_argument("--mesh", default="fsdp=8")
    c.add_argument("--batch", type=int, default=BATCH)
    c.add_argument("--micro-batches", type=int, default=128)
    c.add_argument("--remat", default="none", choices=("none", "block", "full"))
    c.add_argument("--topology")
    c.add_argument("--out", help="write the record here instead of merging it into the results")
    m = sub.add_parser("merge")
    m.add_argument("files", nargs="+")
    sub.add_parser("plan")
    n = sub.add_parser("note")
    n.add_argument("key")
    n.add_argument("text")
    args = parser.parse_args(argv)
    {
        "state": cmd_state,
        "compile": cmd_compile,
        "merge": cmd_merge,
        "plan": cmd_plan,
        "note": cmd_note,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
