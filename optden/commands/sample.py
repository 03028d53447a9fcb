"""``optden sample``: a resumable sampling job with the optimal denoiser.

Writes ``--out`` as it goes (see ``optden.jobs``): ``manifest.json``, one
``batch_<b>.npz`` per finished batch (samples, x_T, NN1/NN2 distances and indices,
statistics), then ``samples.npy``, ``nearest.npz``, ``summary.json`` and ``nearest.png``
(the first samples beside their nearest training image). Run the same command again
after an interruption: finished batches are skipped. Under torchrun, ``--distributed``
shards the rows over the ranks (rank 0 writes). The progress bar moves per solver step.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ._args import add_data_argument, nonneg_int, open_dataset, positive_int


def _solver_option_names() -> list[str]:
    """Every option some solver of ``SOLVERS`` takes (EDM's S_churn, S_min, S_max, S_noise)."""
    from ..sampling import SOLVERS

    return sorted({k for s in SOLVERS.values() for k in s.options})


def _nearest_png(out: Path, ds, title: str) -> Path:
    """The first samples of a finished job beside their nearest training image."""
    import numpy as np
    import torch

    from ..memorization import MEMORIZED_RATIO, Memorization
    from ..plot import nearest_grid

    near = np.load(out / "nearest.npz")
    k = min(32, near["nn_idx"].shape[0])
    t = {name: torch.from_numpy(np.ascontiguousarray(near[name][:k])) for name in near.files}
    mem = Memorization(t["nn_dist"][:, 0], t["nn_dist"][:, 1], t["nn_idx"][:, 0], t["nn_idx"][:, 1],
                       t["nn_ratio"], t["memorized"], MEMORIZED_RATIO)
    samples = torch.from_numpy(np.array(np.load(out / "samples.npy", mmap_mode="r")[:k]))
    return nearest_grid(samples, mem, ds, out / "nearest.png", title=title)


def run(args) -> int:
    from ..jobs import run_sample_job
    from ..engine.rows import parse_bytes

    budget = parse_bytes(args.memory_budget, "--memory-budget")
    opts = {k: getattr(args, k) for k in _solver_option_names() if getattr(args, k) is not None}
    ds = open_dataset(args.data, args.max_rows, args.seed, args.split, args.layout)
    rank = 0
    if args.distributed:
        from ..distributed import ShardedDenoiser, init_distributed

        # "cuda" / "auto" under torchrun: this rank's GPU, cuda:LOCAL_RANK
        device = init_distributed(None if args.device in ("auto", "cuda") else args.device, timeout=args.timeout)
        den = ShardedDenoiser(ds, device=device, backend=args.backend, memory_budget=budget)
        rank = den.rank
    else:
        import torch

        from ..denoiser import OptimalDenoiser

        device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
        device = "cpu" if device == "auto" else device
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise InputError(f"device: not a torch device: {args.device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device: {args.device!r} requested but CUDA is not available")
        den = OptimalDenoiser(ds, device=dev, backend=args.backend)
        if budget is not None:
            den.source().memory_budget = budget
    say = (lambda line: print(line, flush=True)) if rank == 0 else None
    if rank == 0:
        print(f"dataset  {ds}", flush=True)
        print(f"job      {args.n} samples in batches of {args.batch_size}, {args.solver} {args.steps} steps, "
              f"schedule {args.schedule}, seed {args.seed} -> {args.out}", flush=True)
    res = run_sample_job(
        den, args.out, n=args.n, batch_size=args.batch_size, steps=args.steps, solver=args.solver,
        schedule=args.schedule, seed=args.seed, label=args.label, sigma_stop=args.sigma_stop,
        solver_options=opts, progress=args.progress, log=say, load_results=False,
    )
    if args.distributed:
        from ..distributed import shutdown

        shutdown()
    if rank == 0:
        s = res.summary
        print(f"done     computed {len(res.computed)} batch(es), skipped {len(res.skipped)} finished before; "
              f"memorized fraction {s['memorized_fraction']:.3f} (NN1/NN2 < 1/3), mean NN1 {s['nn1_mean']:.4g}",
              flush=True)
        pictures = len(ds.image_shape) == 3 and ds.image_shape[0] in (1, 3)
        if pictures:
            _nearest_png(Path(args.out), ds, f"{args.data} (M={ds.M}): D* samples ({args.solver}, {args.steps} steps) "
                                             "| nearest training image")
        print(f"wrote    {Path(args.out) / 'samples.npy'}, nearest.npz, summary.json"
              + (", nearest.png" if pictures else ""), flush=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample with the optimal denoiser (resumable job)",
                       description=__doc__.split("\n\n")[0])
    add_data_argument(p)
    p.add_argument("--n", "--num-samples", dest="n", type=positive_int, default=64,
                   help="number of samples (default 64); under torchrun write --num-samples (torchrun "
                        "takes --n for an abbreviation of its own options)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per batch file (default 64)")
    p.add_argument("--steps", type=positive_int, default=18, help="solver steps (default 18)")
    from ..sampling import SOLVERS

    p.add_argument("--solver", default="heun", help="; ".join(f"{k}: {v.description}" for k, v in SOLVERS.items())
                   + " (default heun)")
    for name in _solver_option_names():
        takes = [k for k, v in SOLVERS.items() if name in v.options]
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=None,
                       help=f"{', '.join(takes)} only (default {SOLVERS[takes[0]].options[name]})")
    p.add_argument("--schedule", default="edm", help="edm, polynomial, loguniform, vp or flow (default edm)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed (default 0)")
    p.add_argument("--sigma-stop", type=float, default=None, help="ODE-jump at the first sigma <= this")
    p.add_argument("--out", default="sample_out", help="job directory (default sample_out)")
    p.add_argument("--device", default="cpu",
                   help="torch device, or auto (default cpu); with --distributed, cuda means cuda:LOCAL_RANK")
    p.add_argument("--backend", default="auto", help="denoiser backend (default auto; see optden info)")
    p.add_argument("--memory-budget", default=None,
                   help="most bytes of data rows a streamed pass holds at once, e.g. 512M (memory-mapped sets)")
    p.add_argument("--distributed", action="store_true",
                   help="shard the rows over torch.distributed ranks (launch with torchrun)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a stalled collective fails")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=run)

