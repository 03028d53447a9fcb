"""``optden index DATASET_DIR``: build a FAISS index for certified pruning and save it
beside the dataset (``index_<kind>.faiss`` + ``index_<kind>.json``)."""
from __future__ import annotations

import time


def run(args) -> int:
    from optden.data import Dataset
    from optden.prune import PruneIndex, index_paths

    ds = Dataset.load(args.dataset_dir, verify=not args.no_verify)
    t0 = time.perf_counter()
    index = PruneIndex.build(ds, args.kind, nlist=args.nlist, niter=args.niter, seed=args.seed,
                             train_rows=args.train_rows)
    index.save(args.dataset_dir)
    fpath, jpath = index_paths(args.dataset_dir, args.kind)
    extra = f", nlist={index.nlist}, median radius {sorted(index.radii)[index.nlist // 2]:.4g} (raw units)" \
        if args.kind == "ivf" else ""
    print(f"built {args.kind} index of {ds.M} x {ds.d} rows in {time.perf_counter() - t0:.1f} s{extra}")
    print(f"wrote {fpath} and {jpath}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("index", help="build a FAISS index for certified pruning, saved beside the dataset")
    p.add_argument("dataset_dir", help="a dataset directory written by Dataset.save")
    p.add_argument("--kind", choices=("flat", "ivf"), default="ivf",
                   help="flat: exhaustive search; ivf: inverted lists with exact cluster radii (default)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 sqrt(M))")
    p.add_argument("--niter", type=int, default=10, help="k-means iterations for IVF (default 10)")
    p.add_argument("--train-rows", type=int, default=None, help="rows sampled for k-means (default 64 nlist)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed")
    p.add_argument("--no-verify", action="store_true", help="skip the dataset checksum on load")
    p.set_defaults(func=run)
