"""``optden demo``: optimal sampling on bundled real data (scikit-learn's digits)."""
from __future__ import annotations

import time


def run(args) -> int:
    import torch

    import optden
    from optden.sampling import sample

    ds = optden.Dataset.demo("digits")
    den = optden.OptimalDenoiser(ds, device=args.device)
    print(f"dataset   {ds}")
    t0 = time.perf_counter()
    samples = sample(den, n=args.n, steps=args.steps, solver="heun", schedule="edm", seed=args.seed)
    t1 = time.perf_counter()
    dist, _ = den.nearest(samples.samples, 2)
    memorized = float((dist[:, 0] / dist[:, 1] < 1.0 / 3.0).to(torch.float64).mean())
    print(f"sampling  {args.n} samples, EDM Heun {args.steps} steps ({samples.nfe} evaluations): {t1 - t0:.2f} s")
    print(f"memorized {memorized:.3f} of samples have NN1/NN2 < 1/3 (the optimal denoiser reproduces training images)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("demo", help="optimal sampling on bundled real data")
    p.add_argument("--n", type=int, default=64, help="number of samples")
    p.add_argument("--steps", type=int, default=18, help="Heun steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
