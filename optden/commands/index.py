"""``optden index DATASET_DIR``: build an index for certified pruning and save it beside
the dataset: the lower-bound embedding (``index_embedding.npz`` + ``.json``, what
prune="auto" uses) or a FAISS index (``index_<kind>.faiss`` + ``index_<kind>.json``)."""
from __future__ import annotations

import time

from ._args import positive_int


def run(args) -> int:
    from optden.data import Dataset
    from optden.prune import EmbeddingIndex, PruneIndex, index_paths

    ds = Dataset.load(args.dataset_dir, verify=not args.no_verify)
    t0 = time.perf_counter()
    if args.kind == "embedding":
        index = EmbeddingIndex.build(ds, k=args.k, leaf_size=args.leaf_size, seed=args.seed)
        index.save(args.dataset_dir)
        fpath, jpath = EmbeddingIndex.paths(args.dataset_dir)
        extra = f", k={index.k}, {index.nlist} leaves"
    else:
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
    p = sub.add_parser("index", help="build an index for certified pruning, saved beside the dataset")
    p.add_argument("dataset_dir", help="a dataset directory written by Dataset.save")
    p.add_argument("--kind", choices=("embedding", "flat", "ivf"), default="embedding",
                   help="embedding: certified lower-bound embedding, what prune='auto' loads (default); "
                        "flat: FAISS exhaustive search; ivf: FAISS inverted lists with exact cluster radii")
    p.add_argument("--k", type=positive_int, default=None,
                   help="embedding: principal directions (default d / 4 within 32..128)")
    p.add_argument("--leaf-size", type=positive_int, default=None,
                   help="embedding: rows per leaf, at most (default: 256 for k <= 64, else 64)")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 sqrt(M))")
    p.add_argument("--niter", type=int, default=10, help="k-means iterations for IVF (default 10)")
    p.add_argument("--train-rows", type=int, default=None, help="rows sampled for k-means (default 64 nlist)")
    p.add_argument("--seed", type=int, default=0, help="k-means or principal-direction sample seed")
    p.add_argument("--no-verify", action="store_true", help="skip the dataset checksum on load")
    p.set_defaults(func=run)
