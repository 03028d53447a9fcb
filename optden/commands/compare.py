"""``optden compare``: how well D*, the local denoisers and the Gaussian explain a model.

The model is ``gaussian``, a diffusers folder or a saved module ``D(x, sigma)`` (as for
``optden deviation``).
It samples from noise with its own sampler; at every step each candidate denoiser is
compared with the model's output at the same point (the field's protocol), and with
``--trajectory candidate`` / ``both`` also on each candidate's own trajectory. Writes
``compare.json`` (per sigma: median and mean r^2, MSE, per candidate and trajectory) and
``compare.png`` (r^2 and MSE against sigma; ``--format`` svg / pdf).
"""
from __future__ import annotations

import json
import time

from ._args import (add_common_arguments, add_data_argument, add_model_arguments, make_denoiser, open_dataset, out_dir,
                    positive_int)
from ..errors import InputError

#: Candidate names the command knows; "local", "equivariant", "composite" are LocalDenoisers.
CANDIDATES = ("dstar", "local", "equivariant", "composite", "gaussian")


def make_candidates(names: list, ds, args) -> dict:
    """{name: denoiser} for the names of CANDIDATES."""
    from ..local import LocalDenoiser
    from .deviation import load_model

    out = {}
    for name in names:
        if name == "dstar":
            out[name] = make_denoiser(ds, args.device, args.backend)
        elif name == "gaussian":
            out[name] = load_model("gaussian", ds, args.device, label=args.label)  # of the class, with --label
        elif name in ("local", "equivariant", "composite"):
            out[name] = LocalDenoiser(ds, args.patch_size, kind=name, padding=args.padding, device=args.device)
        else:
            raise InputError(f"candidates: unknown candidate {name!r}; expected some of {', '.join(CANDIDATES)}")
    return out


def run(args) -> int:
    from ..agreement import agreement
    from ..plot import agreement_curves
    from .deviation import load_model

    ds = open_dataset(args.data, args.max_rows, args.seed, args.split, args.layout)
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if not names:
        raise InputError("candidates: expected a comma-separated list, e.g. dstar,local,equivariant")
    cands = make_candidates(names, ds, args)
    model = load_model(args.model, ds, args.device, args.batch_size, args.label)
    out = out_dir(args.out)
    t0 = time.perf_counter()
    res = agreement(model, cands, n=args.n, steps=args.steps, solver=args.solver, schedule=args.schedule,
                    seed=args.seed, trajectory=args.trajectory, batch_size=args.batch_size,
                    labels=args.label)
    seconds = time.perf_counter() - t0
    summary = {"data": args.data, "M": ds.M, "image_shape": list(ds.image_shape), "model_spec": args.model,
               "patch_size": args.patch_size, "padding": args.padding, "label": args.label, **res.to_dict(), "seconds": seconds}
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    fig = out / f"compare.{args.format}"
    agreement_curves(res, fig, title=f"{args.data} (M={ds.M}): {args.model}")
    print(f"data       {ds}")
    print(f"model      {args.model}; {args.n} samples, {args.solver} on {args.schedule} with {args.steps} steps, "
          f"{seconds:.2f} s")
    for traj, per in res.stats.items():
        print(f"median r^2 on the {'model' if traj == 'model' else 'candidate'}'s trajectory")
        print(f"{'sigma':>10} " + " ".join(f"{n:>12}" for n in per))
        for i, s in enumerate(res.sigmas.tolist()):
            print(f"{s:10.4g} " + " ".join(f"{float(st.r2_median[i]):12.4f}" for st in per.values()))
    print(f"wrote      {out / 'compare.json'}, {fig}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="r^2 of D*, the local denoisers and the Gaussian against a model",
                       description=__doc__.split("\n\n")[0])
    add_data_argument(p)
    add_model_arguments(p, 10)
    p.add_argument("--candidates", default="dstar,local,equivariant",
                   help=f"comma-separated candidates among {', '.join(CANDIDATES)} (default dstar,local,equivariant)")
    p.add_argument("--patch-size", type=positive_int, default=3, help="odd patch size of the local denoisers (default 3)")
    p.add_argument("--padding", choices=("circular", "zero"), default="circular",
                   help="window padding of the local denoisers (default circular)")
    p.add_argument("--trajectory", choices=("model", "candidate", "both"), default="model",
                   help="compare on the model's trajectory (the protocol), each candidate's own, or both")
    add_common_arguments(p, "compare_out")
    p.set_defaults(func=run, n=16)
