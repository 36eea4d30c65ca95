"""Image folders and archives: ``<split>/<class>/*.png|jpg`` (or ``<class>/*``) -> uint8 arrays.

``path`` is a folder or a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive. Classes are the sorted
folder names, labelled 0..K-1. Files are listed class-interleaved (the k-th file of every class
in turn, each class's files in name order), so a prefix (``num_examples``) is class-balanced.
Decoding uses Pillow in a thread pool; every image must have the configured ``(H, W, C)``.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from scm_jax.data.arrays import ArrayDataset, class_interleaved_order

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_KEEP_MODES = ("L", "LA", "RGB", "RGBA")
_CONVERT_MODES = {"1": "L", "CMYK": "RGB", "YCbCr": "RGB"}
_CHUNK = 256  # images per decoding job

Log = Callable[[str], None]


def is_archive(path: str | Path) -> bool:
    """Whether ``path`` names a ``.tar``, ``.tar.gz`` or ``.tgz`` archive (by its suffix)."""
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _is_image_name(name: str) -> bool:
    parts = name.split("/")
    hidden = any(p.startswith(".") or p == "__MACOSX" for p in parts)
    return not hidden and name.lower().endswith(IMAGE_SUFFIXES)


def resolve_layout(
    names: Sequence[str], *, split: str, where: str
) -> tuple[list[str], np.ndarray, list[str]]:
    """Pick the images of ``split`` and label them by class folder.

    Args:
      names: image paths relative to the dataset root, ``/``-separated.
      split: the split folder to use when the layout is ``<split>/<class>/<file>``.
      where: the folder or archive, for error messages.
    Returns:
      ``(files, labels, classes)``: the chosen names in class-interleaved order, int32 labels
      ``(len(files),)`` (index into ``classes``) and the sorted class folder names.
    Raises:
      ValueError: no images, or a layout other than ``<split>/<class>/*`` or ``<class>/*``.
    """
    if not names:
        raise ValueError(f"{where} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    parts = [n.split("/") for n in names]
    if any(len(p) == 3 and p[0] == split for p in parts):
        rows = sorted((p[1], n) for p, n in zip(parts, names, strict=True) if p[0] == split)
        rows = [(c, n) for c, n in rows if len(n.split("/")) == 3]
    elif all(len(p) == 2 for p in parts):
        rows = sorted((p[0], n) for p, n in zip(parts, names, strict=True))
    else:
        splits = sorted({p[0] for p in parts if len(p) == 3})
        raise ValueError(
            f"{where} is not laid out as <split>/<class>/<image> or <class>/<image> "
            f"with split {split!r} (dataset.split); "
            + (f"splits present: {splits}; " if splits else "")
            + f"found e.g. {sorted(names)[:3]}"
        )
    classes = sorted({c for c, _ in rows})
    index = {c: k for k, c in enumerate(classes)}
    labels = np.asarray([index[c] for c, _ in rows], np.int32)
    order = class_interleaved_order(labels)
    return [rows[i][1] for i in order], labels[order], classes


def _decode(data: bytes, name: str) -> tuple[np.ndarray, str]:
    """Decode one PNG/JPEG to uint8 ``(H, W, C)`` and its original Pillow mode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            mode = img.mode
            if mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif mode in _CONVERT_MODES:
                img = img.convert(_CONVERT_MODES[mode])
            elif mode not in _KEEP_MODES:
                raise ValueError(f"{name}: unsupported image mode {mode!r} (use 8-bit L or RGB)")
            arr = np.asarray(img, np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{name}: cannot decode image ({e})") from None
    return (arr[:, :, None] if arr.ndim == 2 else arr), mode


def decode_image(data: bytes, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Decode one PNG/JPEG to uint8 ``shape`` ``(H, W, C)``; C is 1 (L), 2 (LA), 3 or 4.

    Palette images become RGB (RGBA with transparency), CMYK/YCbCr become RGB.

    Raises:
      ValueError: undecodable data, an unsupported mode, or a shape other than ``shape``
        (the message names the file ``name``).
    """
    arr, mode = _decode(data, name)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"{name}: image of shape {arr.shape} (H, W, C; mode {mode}) but dataset.shape is "
            f"{tuple(shape)}; resize the images or set --config.dataset.shape"
        )
    return arr


def probe_image_folder(path: str | Path) -> tuple[list[str], tuple[int, ...]]:
    """List a folder's or archive's images and decode the first to learn the image shape.

    Args:
      path: folder, or ``.tar`` / ``.tar.gz`` / ``.tgz`` archive.
    Returns:
      ``(names, shape)``: sorted ``/``-separated image paths relative to the root, and the
      ``(H, W, C)`` of the first image in storage order (as :func:`decode_image` gives it).
    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: a file that is not an archive, an unreadable archive, no images, or a first
        image that cannot be decoded.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image folder or archive {str(path)!r} does not exist")
    if path.is_dir():
        names = _list_folder(path)
        first = (names[0], (path / names[0]).read_bytes()) if names else None
    elif not is_archive(path):
        raise ValueError(f"{path} is a file but not a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    else:
        try:
            with tarfile.open(path, "r:*") as tar:
                members = [
                    m for m in tar.getmembers()
                    if m.isfile() and _is_image_name(m.name.removeprefix("./"))
                ]  # fmt: skip
                fobj = tar.extractfile(members[0]) if members else None
                first = (members[0].name, fobj.read()) if fobj is not None else None
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ValueError(f"{path} is not a readable tar archive ({e})") from None
        names = sorted(m.name.removeprefix("./") for m in members)
    if first is None:
        raise ValueError(f"{path} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return names, _decode(first[1], f"{path}:{first[0]}")[0].shape


def _decode_all(
    items: Iterator[tuple[int, str, bytes | Path]],
    n: int,
    shape: tuple[int, ...],
    log: Log | None,
    where: str,
) -> np.ndarray:
    """Decode ``items`` ``(index, name, bytes or file path)`` into uint8 ``(n, *shape)``.

    Chunks of images go to a thread pool (one job per image would cost more in scheduling than
    the decode); a bounded number of chunks is in flight, so archives stream through bounded
    memory. The first failing image's error is raised.
    """
    out = np.empty((n, *shape), np.uint8)

    def work(chunk: list[tuple[int, str, bytes | Path]]) -> int:
        for i, name, src in chunk:
            data = src.read_bytes() if isinstance(src, Path) else src
            out[i] = decode_image(data, shape, name)
        return len(chunk)

    workers = max(1, min(8, os.cpu_count() or 1))
    t0, done, next_log = time.perf_counter(), 0, max(n // 10, 1)
    with cf.ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: set[cf.Future] = set()

        def collect(return_when: str) -> None:
            nonlocal pending, done, next_log
            finished, pending = cf.wait(pending, return_when=return_when)
            for f in finished:
                done += f.result()
                if log is not None and done >= next_log and done < n:
                    log(f"decoded {done}/{n} images from {where}")
                    next_log = done + max(n // 10, 1)

        try:
            chunk: list[tuple[int, str, bytes | Path]] = []
            for item in items:
                chunk.append(item)
                if len(chunk) == _CHUNK:
                    pending.add(pool.submit(work, chunk))
                    chunk = []
                    if len(pending) >= 2 * workers:
                        collect(cf.FIRST_COMPLETED)
            if chunk:
                pending.add(pool.submit(work, chunk))
            collect(cf.ALL_COMPLETED)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    if log is not None:
        log(f"decoded {n} images from {where} in {time.perf_counter() - t0:.1f} s")
    return out


def _list_folder(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if _is_image_name(p.relative_to(root).as_posix()) and p.is_file()
    )


def load_image_folder(
    path: str | Path,
    *,
    shape: tuple[int, ...],
    split: str = "train",
    num_classes: int = 0,
    num_examples: int = 0,
    log: Log | None = None,
) -> ArrayDataset:
    """Decode a folder or tar archive of ``<split>/<class>/*.png|jpg`` (or ``<class>/*``).

    Args:
      path: folder, or ``.tar`` / ``.tar.gz`` / ``.tgz`` archive.
      shape: ``(H, W, C)`` every image must have.
      split: split folder used when the layout has one (``train/<class>/...``).
      num_classes: K; the folder must hold exactly K classes. 0: unconditional (labels dropped).
      num_examples: > 0 reads only the first this many files of the class-interleaved listing.
      log: optional progress callback (a line of text per call).
    Returns:
      An :class:`ArrayDataset` of uint8 images ``(N, H, W, C)`` and int32 labels (or None).
    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: bad layout, class count, shape (names the file) or too few images.
    """
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise FileNotFoundError(f"image folder or archive {where!r} does not exist")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"image datasets need dataset.shape (H, W, C), got {shape}")
    archive = path.is_file()
    if archive and not is_archive(path):
        raise ValueError(f"{where} is a file but not a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    try:
        tar = tarfile.open(path, "r:*") if archive else None
    except tarfile.TarError as e:
        raise ValueError(f"{where} is not a readable tar archive ({e})") from None
    try:
        if tar is not None:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            names = sorted(n for n in members if _is_image_name(n))
        else:
            names = _list_folder(path)
        files, labels, classes = resolve_layout(names, split=split, where=where)
        if num_classes and len(classes) != num_classes:
            raise ValueError(
                f"{where} has {len(classes)} class folders ({', '.join(classes[:12])}"
                f"{', ...' if len(classes) > 12 else ''}) but dataset.num_classes={num_classes}"
            )
        if num_examples:
            if num_examples > len(files):
                raise ValueError(
                    f"dataset.num_examples={num_examples} but {where} holds {len(files)} images"
                )
            files, labels = files[:num_examples], labels[:num_examples]
        if tar is not None:
            order = sorted(range(len(files)), key=lambda i: members[files[i]].offset_data)

            def items() -> Iterator[tuple[int, str, bytes | Path]]:
                for i in order:  # archive order: one forward pass through a compressed stream
                    fobj = tar.extractfile(members[files[i]])
                    assert fobj is not None
                    yield i, f"{where}:{files[i]}", fobj.read()

        else:

            def items() -> Iterator[tuple[int, str, bytes | Path]]:
                for i, n in enumerate(files):
                    yield i, str(path / n), path / n

        x = _decode_all(items(), len(files), shape, log, where)
    finally:
        if tar is not None:
            tar.close()
    return ArrayDataset(x, labels if num_classes else None, num_classes)
