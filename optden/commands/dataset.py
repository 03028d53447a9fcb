"""``optden dataset build | info``: make and inspect dataset directories.

``optden dataset build SRC DIR`` turns a folder or zip of PNG/JPEG images into a dataset
directory (``optden.data.ingest``): progress bar, checksums, resumable after an
interruption, unreadable or mis-sized images left out and listed (``--strict``: fail).
Any other source ``Dataset.open`` reads (a ``.npy`` / ``.npz`` file, the CIFAR-10/100
python pickles, a Hugging Face datasets folder or parquet file) is read whole and saved.
``optden dataset info DIR`` prints its metadata (``--verify`` checks the checksums).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from ._args import positive_int


def _resolution(text: str):
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or H,W (e.g. 64 or 64,64), got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or H,W with positive sizes, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def run_build(args) -> int:
    from ..data import Dataset
    from ..data.ingest import build_dataset
    from ..data.sources import kind_of

    kind = kind_of(args.src)
    if kind != "images":
        if kind == "dataset":
            raise InputError(f"src: {args.src} is already a dataset directory")
        ds = Dataset.open(args.src, split=args.split, channels_last={"auto": None, "nchw": False, "nhwc": True}[
            args.layout], resolution=args.resolution)
        ds.save(args.dir)
        print(f"dataset  {ds}")
        print(f"saved    {args.dir} ({kind} source, {ds.M} rows)")
        return 0
    ds, rep = build_dataset(args.src, args.dir, resolution=args.resolution, chunk_size=args.chunk_size,
                            strict=args.strict, workers=args.workers, progress=args.progress,
                            labels=None if args.no_labels else "auto")
    if rep.already_built:
        print(f"{args.dir} is already built from {args.src} (nothing to do)")
    elif rep.chunks_skipped:
        print(f"resumed: {rep.chunks_skipped} of {rep.chunks} chunk(s) were already done")
    print(f"dataset  {ds}")
    print(f"images   {rep.images} found, {rep.accepted} accepted, {len(rep.rejected)} rejected")
    print(f"sha256   data.npy {rep.sha256}")
    if rep.rejected:
        print(f"rejected (also in {Path(args.dir) / 'rejected.json'}):")
        for name, why in rep.rejected[:50]:
            print(f"  {name}: {why}")
        if len(rep.rejected) > 50:
            print(f"  ... and {len(rep.rejected) - 50} more")
    return 0


def run_info(args) -> int:
    from ..data import Dataset

    ds = Dataset.load(args.dir, verify=args.verify)
    meta = json.loads((Path(args.dir) / "meta.json").read_text())
    info = {
        "path": str(args.dir), "M": ds.M, "d": ds.d, "image_shape": list(ds.image_shape), "dtype": ds.dtype,
        "scale": ds.scale, "offset": ds.offset, "num_classes": ds.num_classes, "bytes": ds.nbytes,
        "sha256": meta.get("sha256", {}), "checksums_verified": bool(args.verify),
    }
    rej = Path(args.dir) / "rejected.json"
    if rej.is_file():
        info["rejected_images"] = len(json.loads(rej.read_text()).get("rejected", []))
    print(json.dumps(info, indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("dataset", help="build or inspect a dataset directory", description=__doc__.split("\n\n")[0])
    dsub = p.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    b = dsub.add_parser("build", help="folder or zip of PNG/JPEG images -> dataset directory (resumable)")
    b.add_argument("src", help="folder (searched recursively) or zip file of PNG/JPEG images; or a .npy / .npz "
                                "file, CIFAR-10/100 python pickles (.tar.gz or folder), a Hugging Face datasets "
                                "folder or .parquet file")
    b.add_argument("--split", default=None, help="CIFAR / Hugging Face split: train (default), test; CIFAR: all")
    b.add_argument("--layout", choices=("auto", "nchw", "nhwc"), default="auto",
                   help="image layout of a 4-D .npy / .npz array (default auto: detected, ambiguous shapes refused)")
    b.add_argument("dir", help="output dataset directory")
    b.add_argument("--resolution", type=_resolution, default=None,
                   help="resize every image to N (square) or H,W; default: all must match the first image")
    b.add_argument("--chunk-size", type=positive_int, default=4096, help="images per resumable chunk (default 4096)")
    b.add_argument("--strict", action="store_true", help="fail on any unreadable or mis-sized image")
    b.add_argument("--no-labels", action="store_true", help="ignore dataset.json labels")
    b.add_argument("--workers", type=positive_int, default=None, help="decoding threads (default: CPU count, <= 8)")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    b.set_defaults(func=run_build)
    i = dsub.add_parser("info", help="metadata of a dataset directory")
    i.add_argument("dir", help="dataset directory")
    i.add_argument("--verify", action="store_true", help="verify the sha256 checksums (reads every file)")
    i.set_defaults(func=run_info)
