"""``optden meanshift``: mode seeking ``x <- D*(x; sigma)`` on a data set.

Starting points are training rows plus noise of the bandwidth (``--start data``, the
default: which row does each point climb back to?) or pure noise ``sigma_max * n``
(``--start noise``). ``--annealed`` follows a decreasing schedule instead of one sigma.
Writes ``modes.npy`` (n, *shape) float64, ``meanshift.json`` and ``modes.png`` (each
mode beside its nearest training image).
"""
from __future__ import annotations

import json
import time

from ..errors import InputError
from ..fileio import atomic_write_npy
from ._args import add_common_arguments, add_data_argument, make_denoiser, open_dataset, out_dir, positive_float, positive_int


def run(args) -> int:
    import numpy as np
    import torch

    from ..meanshift import annealed_mean_shift, mean_shift
    from ..memorization import memorization
    from ..plot import nearest_grid
    from ..schedules import get_schedule

    ds = open_dataset(args.data, args.max_rows, args.seed, args.split, args.layout)
    den = make_denoiser(ds, args.device, args.backend)
    out = out_dir(args.out)
    g = torch.Generator().manual_seed(args.seed)
    shape = ds.image_shape
    start_rows = None
    if args.start == "data":
        pool = torch.arange(ds.M) if args.label is None else torch.from_numpy(ds.rows_with_label(args.label))
        start_rows = pool[torch.randint(0, pool.numel(), (args.n,), generator=g)]
        noise = torch.randn((args.n, *shape), generator=g, dtype=torch.float64)
        x0 = ds.images(start_rows.numpy()) + args.sigma * noise
    else:
        scale = args.sigma_max if args.annealed else args.sigma
        x0 = scale * torch.randn((args.n, *shape), generator=g, dtype=torch.float64)
    t0 = time.perf_counter()
    if args.annealed:
        if not args.sigma < args.sigma_max:
            raise InputError(f"sigma: must be < --sigma-max ({args.sigma_max:g}) with --annealed, got {args.sigma:g}")
        sched = get_schedule(args.schedule, args.steps, sigma_min=args.sigma, sigma_max=args.sigma_max)
        res = annealed_mean_shift(den, x0, sched, iters_per_sigma=args.max_iter, tol=args.tol, labels=args.label)
    else:
        res = mean_shift(den, x0, args.sigma, max_iter=args.max_iter, tol=args.tol, labels=args.label)
    seconds = time.perf_counter() - t0
    mem = memorization(res.modes, den, labels=args.label)
    modes = res.modes.numpy()
    atomic_write_npy(out / "modes.npy", modes.dtype, modes.shape, [modes])
    summary = {
        "data": args.data, "M": ds.M, "d": ds.d, "n": args.n, "sigma": args.sigma, "start": args.start,
        "annealed": bool(args.annealed), "max_iter": args.max_iter, "tol": args.tol, "seed": args.seed,
        "label": args.label,
        "converged": int(res.n_converged),
        "fraction_converged": res.n_converged / args.n,
        "iterations_mean": float(res.iterations.double().mean()),
        "iterations_max": int(res.iterations.max()),
        "nearest_index": res.nearest_index.tolist(),
        "nearest_distance": res.nearest_distance.tolist(),
        "converged_flags": res.converged.tolist(),
        "iterations": res.iterations.tolist(),
        "fraction_memorized_modes": mem.fraction,
        "seconds": seconds,
    }
    if start_rows is not None:
        summary["start_rows"] = start_rows.tolist()
        summary["fraction_back_to_start_row"] = float((res.nearest_index == start_rows).double().mean())
    (out / "meanshift.json").write_text(json.dumps(summary, indent=2))
    if len(shape) == 3 and shape[0] in (1, 3):
        nearest_grid(res.modes, mem, ds, out / "modes.png",
                     title=f"{args.data} (M={ds.M}): mean-shift modes at sigma {args.sigma:g} | nearest training image")
    print(f"data        {ds}")
    print(f"mean shift  {'annealed to ' if args.annealed else ''}sigma={args.sigma:g}, {args.n} points from "
          f"{args.start}: {res.n_converged}/{args.n} converged (tol {args.tol:g}), iterations mean "
          f"{summary['iterations_mean']:.1f} max {summary['iterations_max']}, {seconds:.2f} s")
    if start_rows is not None:
        print(f"modes       {summary['fraction_back_to_start_row']:.3f} returned to the training row they started from; "
              f"median distance to the nearest row {float(res.nearest_distance.median()):.4g}")
    print(f"wrote       {out / 'modes.npy'}, {out / 'meanshift.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("meanshift", help="mean-shift mode seeking with the optimal denoiser",
                       description=__doc__.split("\n\n")[0])
    add_data_argument(p)
    p.add_argument("--sigma", type=positive_float, default=0.3,
                   help="bandwidth (with --annealed: the smallest sigma) (default 0.3)")
    p.add_argument("--start", choices=("data", "noise"), default="data",
                   help="start from training rows + sigma * noise, or from pure noise (default data)")
    p.add_argument("--max-iter", type=positive_int, default=100,
                   help="most iterations (with --annealed: per sigma level) (default 100)")
    p.add_argument("--tol", type=positive_float, default=1e-6, help="stop when ||dx|| < tol (default 1e-6)")
    p.add_argument("--annealed", action="store_true", help="anneal sigma from --sigma-max down to --sigma")
    p.add_argument("--sigma-max", type=positive_float, default=80.0, help="largest sigma of the annealing (default 80)")
    p.add_argument("--steps", type=positive_int, default=18, help="annealing levels (default 18)")
    p.add_argument("--schedule", choices=("edm", "polynomial", "loguniform"), default="edm",
                   help="annealing schedule (default edm)")
    add_common_arguments(p, "meanshift_out")
    p.set_defaults(func=run)
