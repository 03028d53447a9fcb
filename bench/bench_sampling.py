"""Optimal sampling end to end: certified pruned vs dense (issue 6; docs/design.md, "Pruning").

A full EDM Heun run (18 steps = 35 evaluations, ``optden.sample(den, n, steps=18,
solver="heun")``) with the dense denoiser and with the pruned one, in the same process:

* patches: ``optden.Dataset.demo("patches")`` (283,629 real 8x8 RGB patches, d = 192);
* cifar:   random uint8 rows of CIFAR-10 size (M = 50,000, d = 3072; ``--M`` shrinks).

Reported per (data, n, index): wall time of each run (the index build is timed apart),
the pruned run's cost in dense-pass equivalents (pruned time / dense time per
evaluation), how many evaluations were answered pruned / from the neighbour cache /
dense, the worst certificate (largest excluded-weight bound of any evaluation), and the
largest relative difference of the samples from the dense run. Prints a table, writes
``bench/sampling.csv`` and, with ``--results``, ``bench/RESULTS_sampling.md``.

    .venv/bin/python bench/bench_sampling.py                  # the full run
    .venv/bin/python bench/bench_sampling.py --quick          # small and fast
"""
from __future__ import annotations

import argparse
import csv
import datetime
import time

import numpy as np
import torch

from _common import HERE, commit, machine

import optden
from optden.prune import PruneIndex

EVALS = 35  # EDM Heun, 18 steps


class Recorder:
    """Wraps an OptimalDenoiser for ``optden.sample``; keeps each evaluation's worst bound
    and modes. Same signature and attributes as the denoiser it wraps."""

    def __init__(self, den):
        self.den = den
        self.device, self.d, self.image_shape = den.device, den.d, den.image_shape
        self.bounds, self.modes, self.sigmas = [], [], []

    def __call__(self, x, sigma, labels=None):
        ev = self.den.denoise_certified(x, sigma, labels=labels)
        self.bounds.append(float(ev.bound.max()))
        self.modes.append(list(ev.mode))
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return ev.denoised.reshape(x.shape)


def run_case(name, ds, index, n, seed, dense_run=None):
    """One pruned run (and the dense run unless given). Returns (row dict, dense run)."""
    if dense_run is None:
        dense = Recorder(optden.OptimalDenoiser(ds, prune="off"))
        t = time.perf_counter()
        dense_run = optden.sample(dense, n=n, steps=18, solver="heun", seed=seed)
        dense_run.wall = time.perf_counter() - t
        dense_run.rec = dense
    pden = optden.OptimalDenoiser(ds, prune=index)
    pruned = Recorder(pden)
    t = time.perf_counter()
    prun = optden.sample(pruned, n=n, steps=18, solver="heun", seed=seed)
    wall = time.perf_counter() - t
    modes = [m for ms in pruned.modes for m in ms]
    diff = (prun.samples - dense_run.samples).reshape(n, -1).norm(dim=1)
    rel = float((diff / dense_run.samples.reshape(n, -1).norm(dim=1)).max())
    st = pden.pruner().stats
    per_eval = dense_run.wall / len(dense_run.rec.bounds)
    row = {
        "data": name, "M": ds.M, "d": ds.d, "n": n, "index": index.kind,
        "evals": len(pruned.bounds),
        "dense_s": round(dense_run.wall, 2), "pruned_s": round(wall, 2),
        "speedup": round(dense_run.wall / wall, 2),
        "dense_pass_equiv": round(wall / per_eval, 2),
        "pruned_frac": round(modes.count("pruned") / len(modes), 3),
        "cached_frac": round(modes.count("cached") / len(modes), 3),
        "dense_frac": round(1 - (modes.count("pruned") + modes.count("cached")) / len(modes), 3),
        "searches": st["searches"],
        "rows_scored_per_query_eval": round(st["rows_scored"] / max(1, len(modes)), 1),
        "worst_bound": f"{max(pruned.bounds):.2e}",
        "max_rel_diff": f"{rel:.2e}",
        "smallest_dense_sigma": f"{min([s for s, ms in zip(pruned.sigmas, pruned.modes) if any(m not in ('pruned', 'cached') for m in ms)] or [float('nan')]):.3g}",
    }
    return row, dense_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: 40k patches, M=5000 cifar, n=16")
    p.add_argument("--M", type=int, default=None, help="rows of the random CIFAR-size set (default 50000)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="sample counts (default 64 256)")
    p.add_argument("--data", nargs="+", default=["patches", "cifar"], choices=["patches", "cifar"])
    p.add_argument("--kind", nargs="+", default=None, choices=["flat", "ivf"],
                   help="index kinds (default: ivf for patches, flat for the random set, where "
                        "clusters carry no structure and k-means on d = 3072 costs minutes here)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", action="store_true", help="write bench/RESULTS_sampling.md")
    args = p.parse_args(argv)
    ns = args.n or ([16] if args.quick else [64, 256])
    rows = []
    for name in args.data:
        if name == "patches":
            ds = optden.Dataset.demo("patches", max_rows=40_000 if args.quick else None)
        else:
            M = args.M or (5000 if args.quick else 50_000)
            x = np.random.default_rng(1).integers(0, 256, size=(M, 3, 32, 32), dtype=np.uint8)
            ds = optden.Dataset.from_array(x)
        _ = ds.centered_sqnorms
        for kind in args.kind or (["ivf"] if name == "patches" else ["flat"]):
            t = time.perf_counter()
            index = PruneIndex.build(ds, kind)
            build = time.perf_counter() - t
            print(f"[{name}] {kind} index of {ds.M} x {ds.d} built in {build:.1f} s", flush=True)
            dense_runs = {}
            for n in ns:
                row, dense_runs[n] = run_case(name, ds, index, n, args.seed, dense_runs.get(n))
                row["build_s"] = round(build, 1)
                rows.append(row)
                print(row, flush=True)
    cols = list(rows[0])
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    table = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    table += ["| " + " | ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) + " |" for r in rows]
    print("\n".join(table))
    with open(HERE / "sampling.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    if args.results:
        backend = optden.OptimalDenoiser(ds, prune="off").backend.name
        head = (f"## Optimal sampling, pruned vs dense (bench/bench_sampling.py)\n\n"
                f"Date {datetime.date.today()}, machine: {machine()}, commit {commit()} "
                f"(plus the uncommitted pruning work). EDM Heun, 18 steps = {EVALS} evaluations, seed "
                f"{args.seed}; dense = `prune=\"off\"` (backend \"auto\": {backend}), pruned = certified FAISS pruning "
                f"with the neighbour cache. dense_pass_equiv = pruned time / (dense time / evaluations).\n\n")
        (HERE / "RESULTS_sampling.md").write_text(head + "\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
