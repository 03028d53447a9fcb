"""Dataset ingestion at scale: a folder or zip of PNG/JPEG images -> a dataset directory.

``build_dataset(src, out_dir)`` decodes the images in sorted order of their relative
path (the order of ``Dataset.from_images`` and of EDM's dataset tool), in chunks of
``chunk_size`` images. Each finished chunk is written atomically to
``out_dir/.build/chunk_<c>.npy`` with a small JSON record (its sha256, which images it
holds, which it rejected and why), so an interrupted build resumes: chunks already on
disk (and matching their checksum) are skipped. At the end the chunks are concatenated
into a Dataset and saved with ``Dataset.save`` (data.npy, norms, labels, meta.json with
checksums). The commit is atomic: ``build.json`` (the plan) and ``rejected.json`` are
written before the save, whose ``meta.json`` (written last) is the one marker that the
build finished; ``.build`` is removed after it. A kill at any point leaves a directory the
next run resumes. A chunk records the size and modification time (CRC for a zip member)
of each of its images: a chunk whose source images changed since is decoded again. A
full disk is a ``DiskFullError`` naming the directory (the chunks written stay).

Images that cannot be decoded, or whose size or channel count differs from the
reference image (the first decodable one, or ``resolution`` when given, which resizes
every image instead) are rejected: left out of the dataset and listed with the reason.
``strict=True`` turns any rejection into a ``DatasetError`` (nothing is saved).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError, DatasetNotFoundError, InputError
from ..fileio import DirectoryLock, atomic_write, atomic_write_npy, remove_stale_temporaries, sha256_file
from ..validate import check_positive_int
from .dataset import Dataset
from .images import ImageSource, check_resolution, decode_image, labels_from_dataset_json, list_some

__all__ = ["build_dataset", "BuildReport", "list_images"]

BUILD_FORMAT = "optden.ingest"
BUILD_VERSION = 1


@dataclass
class BuildReport:
    """What a build did. rejected: [(relative path, reason)]; chunks_skipped: resumed chunks."""

    out_dir: Path
    images: int = 0
    accepted: int = 0
    rejected: list = field(default_factory=list)
    chunks: int = 0
    chunks_skipped: int = 0
    image_shape: tuple = ()
    sha256: str = ""
    already_built: bool = False


def list_images(src) -> list[str]:
    """Relative paths of the images a build of ``src`` would read, in dataset order."""
    with ImageSource(src, "src") as s:
        return list(s.names)


def _decode(source: ImageSource, name: str, resolution):
    try:
        data = source.read(name)
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:
        return f"unreadable ({e})"
    try:
        return decode_image(data, resolution)
    except ValueError as e:
        return str(e)


def _reference_shape(source: ImageSource, resolution, names):
    """(C, H, W) of the first decodable image (its name too); every image must match it."""
    for name in names:
        img = _decode(source, name, resolution)
        if not isinstance(img, str):
            h, w, c = img.shape
            return (c, h, w), name
    raise DatasetError(f"src: {source.path}: none of its {len(names)} images can be decoded")


def _plan(source: ImageSource, resolution, chunk_size: int, labels_given: bool) -> dict:
    h = hashlib.sha256("\n".join(source.names).encode())
    return {
        "format": BUILD_FORMAT,
        "version": BUILD_VERSION,
        "source": str(source.path.resolve()),
        "images": len(source.names),
        "names_sha256": h.hexdigest(),
        "resolution": list(resolution) if resolution is not None else None,
        "chunk_size": chunk_size,
        "labels": labels_given,
    }


def _chunk_done(build: Path, c: int, names: list[str], stamps: list) -> dict | None:
    rec_path = build / f"chunk_{c:06d}.json"
    arr_path = build / f"chunk_{c:06d}.npy"
    if not (rec_path.is_file() and arr_path.is_file()):
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except ValueError:
        return None
    if rec.get("names") != names or sha256_file(arr_path) != rec.get("sha256"):
        return None  # damaged or from another plan: rebuilt
    if rec.get("stamps") != stamps:
        return None  # a source image changed since the chunk was decoded: rebuilt
    return rec


def build_dataset(src, out_dir, resolution=None, labels="auto", *, chunk_size: int = 4096, strict: bool = False,
                  workers: int | None = None, progress: bool | None = None, scale=None, offset=None,
                  verify: bool = True) -> tuple[Dataset, BuildReport]:
    """Build a dataset directory from a folder or zip of PNG/JPEG images; resumable.

    src: folder (searched recursively) or zip file. out_dir: the dataset directory.
    resolution: None (every image must have the reference size), an int or (H, W)
        (every image is resized, Lanczos).
    labels: "auto" (EDM's dataset.json at the root, if present) or None.
    chunk_size: images per chunk file (the unit of resumption).
    strict: raise DatasetError listing the bad images instead of leaving them out.
    verify: re-load the saved directory with its checksums verified.

    Returns ``(Dataset.load(out_dir), BuildReport)``.
    """
    from tqdm.auto import tqdm

    src = Path(src)
    out = Path(out_dir)
    if not src.exists():
        raise DatasetNotFoundError(f"src: {src} does not exist")
    if out.exists() and not out.is_dir():
        raise DatasetError(f"out_dir: {out} exists and is not a directory")
    resolution = check_resolution(resolution)
    chunk_size = check_positive_int(chunk_size, "chunk_size")
    if not (labels is None or (isinstance(labels, str) and labels == "auto")):
        raise InputError(f"labels: expected 'auto' or None, got {labels!r}")
    source = ImageSource(src, "src")
    lock = None
    try:
        names = source.names
        if not names:
            raise DatasetError(f"src: {src} holds no PNG/JPEG images")
        all_labels = None
        if labels == "auto" and source.meta is not None:
            all_labels = labels_from_dataset_json(source.meta, names, src)
        plan = _plan(source, resolution, chunk_size, all_labels is not None)
        report = BuildReport(out_dir=out, images=len(names))
        build = out / ".build"
        done_marker = out / "build.json"
        plan_path = build / "plan.json"
        if (out / "meta.json").is_file() and not done_marker.is_file() and _same_plan(plan_path, plan):
            # an earlier optden (its build.json came after the save) killed between the two:
            # the chunks are all there; save again
            (out / "meta.json").unlink()
        if (out / "meta.json").is_file() and done_marker.is_file():
            prev = json.loads(done_marker.read_text())
            if prev.get("plan") != plan:
                raise DatasetError(f"out_dir: {out} already holds a dataset built from other images or options; "
                                   "remove it or choose another directory")
            report.already_built = True
            report.rejected = [tuple(r) for r in prev.get("rejected", [])]
            report.accepted = int(prev.get("accepted", 0))
            ds = Dataset.load(out, verify=verify)
            report.image_shape, report.sha256 = ds.image_shape, json.loads((out / "meta.json").read_text())["sha256"]["data.npy"]
            shutil.rmtree(build, ignore_errors=True)  # a kill after the save left it
            return ds, report
        if (out / "meta.json").is_file():
            raise DatasetError(f"out_dir: {out} already holds a dataset not made by optden dataset build; "
                               "choose another directory")
        out.mkdir(parents=True, exist_ok=True)
        lock = DirectoryLock(out, "out_dir").__enter__()  # one build per directory; released below
        build.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        if plan_path.is_file():
            old = json.loads(plan_path.read_text())
            if old.get("plan") != plan:  # chunks of another build: start over
                shutil.rmtree(build)
                build.mkdir(parents=True)
                old = None
        else:
            old = None
        if old is None:
            ref_shape, ref_name = _reference_shape(source, resolution, names)
            atomic_write(plan_path, lambda f: f.write(json.dumps(
                {"plan": plan, "image_shape": list(ref_shape), "reference": ref_name}, indent=1).encode()))
        else:
            ref_shape, ref_name = tuple(old["image_shape"]), old["reference"]
        remove_stale_temporaries(build)
        report.image_shape = ref_shape
        c, h, w = ref_shape
        d = c * h * w
        chunks = [names[a:a + chunk_size] for a in range(0, len(names), chunk_size)]
        report.chunks = len(chunks)
        workers = workers or min(8, os.cpu_count() or 1)
        recs = []
        bar = tqdm(total=len(names), unit="img", desc="dataset build",
                   disable=progress is False or (progress is None and not _isatty()))
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
                for ci, chunk in enumerate(chunks):
                    stamps = [source.stamp(n) for n in chunk]
                    rec = _chunk_done(build, ci, chunk, stamps)
                    if rec is not None:
                        report.chunks_skipped += 1
                        recs.append(rec)
                        bar.update(len(chunk))
                        continue
                    rows = np.empty((len(chunk), d), dtype=np.uint8)
                    keep, bad = [], []
                    for j, (name, img) in enumerate(zip(chunk, ex.map(lambda n: _decode(source, n, resolution), chunk))):
                        if isinstance(img, str):
                            bad.append([name, img])
                            continue
                        ih, iw, ic = img.shape
                        if (ic, ih, iw) != ref_shape:
                            bad.append([name, f"size {iw}x{ih} with {ic} channel(s), expected {w}x{h} with {c} "
                                              f"channel(s) like {ref_name}"])
                            continue
                        rows[len(keep)] = img.transpose(2, 0, 1).reshape(-1)
                        keep.append(j)
                    arr_path = build / f"chunk_{ci:06d}.npy"
                    data = np.ascontiguousarray(rows[:len(keep)])
                    atomic_write_npy(arr_path, np.uint8, data.shape, [data])
                    rec = {"names": chunk, "stamps": stamps, "kept": keep, "rejected": bad,
                           "sha256": sha256_file(arr_path)}
                    atomic_write(build / f"chunk_{ci:06d}.json", lambda f: f.write(json.dumps(rec).encode()))
                    recs.append(rec)
                    bar.update(len(chunk))
        finally:
            bar.close()
        for rec in recs:
            report.rejected += [tuple(r) for r in rec["rejected"]]
        report.accepted = sum(len(r["kept"]) for r in recs)
        if report.rejected and strict:
            raise DatasetError(f"src: {src}: {len(report.rejected)} image(s) cannot be used"
                               f"{'' if resolution else ' (pass resolution= to resize)'}: "
                               + list_some([f"{n}: {why}" for n, why in report.rejected]))
        if report.accepted == 0:
            raise DatasetError(f"src: {src}: every image was rejected: "
                               + list_some([f"{n}: {why}" for n, why in report.rejected]))
        ds = _assemble(build, recs, len(chunks), report.accepted, d, ref_shape, all_labels, chunk_size, scale, offset)
        # the commit: everything but the dataset first, then Dataset.save, whose meta.json
        # (written last) says the build finished
        atomic_write(out / "rejected.json", lambda f: f.write(json.dumps(
            {"rejected": [{"file": n, "reason": why} for n, why in report.rejected]}, indent=1).encode()))
        atomic_write(done_marker, lambda f: f.write(json.dumps(
            {"plan": plan, "accepted": report.accepted, "rejected": [list(r) for r in report.rejected]},
            indent=1).encode()))
        ds.save(out)
        del ds
        meta = json.loads((out / "meta.json").read_text())
        report.sha256 = meta["sha256"]["data.npy"]
        shutil.rmtree(build, ignore_errors=True)
        return Dataset.load(out, verify=verify), report
    finally:
        source.close()
        if lock is not None:
            lock.__exit__(None, None, None)


def _same_plan(plan_path: Path, plan: dict) -> bool:
    try:
        return json.loads(plan_path.read_text()).get("plan") == plan
    except (OSError, ValueError):
        return False


def _assemble(build: Path, recs, n_chunks, M, d, image_shape, all_labels, chunk_size, scale, offset) -> Dataset:
    """Concatenate the chunk files into one array on disk (build/all.npy, written through a
    file object: ``fileio.atomic_write_npy``) -> a Dataset memory-mapping it read-only."""
    path = build / "all.npy"
    labels = [] if all_labels is not None else None
    for ci, rec in enumerate(recs):
        if labels is not None:
            base = ci * chunk_size
            labels.extend(int(all_labels[base + j]) for j in rec["kept"])
    atomic_write_npy(path, np.uint8, (M, d),
                     (np.load(build / f"chunk_{ci:06d}.npy", mmap_mode="r") for ci in range(len(recs))))
    raw = np.load(path, mmap_mode="r")
    lab = None if labels is None else np.asarray(labels, dtype=np.int64)
    nc = None if all_labels is None else int(all_labels.max()) + 1
    return Dataset(raw, "uint8", image_shape, scale, offset, lab, nc, source=str(build.parent),
                   _mmap_file=path)


def _isatty() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
