"""``optden deviation``: empirical score deviation of a model from the optimal denoiser.

The model is ``gaussian`` (the closed-form linear denoiser of a Gaussian fitted to the
data: the classic generalizing baseline) or a saved torch module whose forward is
``D(x, sigma)`` with x (B, *image_shape) and sigma (B,) (batch dimension dynamic), in the data
set's model space, saved with ``torch.export.save`` (a ``.pt2`` file, loaded with
``torch.export.load(...).module()``) or as TorchScript (``torch.jit.save``). Writes ``deviation.json`` (per sigma: mean, std, quantiles of
``||D_theta - D*||`` and of the score difference, on the model's trajectory, on the
optimal trajectory, and paired) and ``deviation.png``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ._args import add_common_arguments, add_data_argument, add_model_arguments, make_denoiser, open_dataset, out_dir
from ..errors import InputError


def load_model(spec: str, ds, device: str):
    """``gaussian`` -> ``GaussianDenoiser.fit(ds)``; ``*.pt2`` -> ``torch.export.load(...).module()``;
    another file -> ``torch.jit.load`` on ``device``."""
    import torch

    from ..gaussian import GaussianDenoiser

    if spec == "gaussian":
        return GaussianDenoiser.fit(ds, device=device)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"model: expected 'gaussian' or a saved module (.pt2 or TorchScript), and {spec!r} "
                         f"is not a file")
    if path.suffix == ".pt2":
        try:
            return torch.export.load(str(path)).module().to(device)
        except Exception as exc:  # torch.export raises many types for a bad archive
            raise InputError(f"model: {spec!r} is not a torch.export archive ({type(exc).__name__}: {exc})") from None
    try:
        module = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise InputError(f"model: {spec!r} is not a TorchScript file that torch.jit.load can read ({exc})") from None
    module.eval()
    return module


def run(args) -> int:
    from ..deviation import DEVIATION_KINDS, score_deviation
    from ..plot import deviation_curves

    ds = open_dataset(args.data, args.max_rows, args.seed)
    den = make_denoiser(ds, args.device, args.backend)
    model = load_model(args.model, ds, args.device)
    out = out_dir(args.out)
    t0 = time.perf_counter()
    res = score_deviation(model, den, n=args.n, steps=args.steps, solver=args.solver, schedule=args.schedule,
                          seed=args.seed)
    seconds = time.perf_counter() - t0
    summary = {"data": args.data, "M": ds.M, "d": ds.d, "model_spec": args.model, "seed": args.seed, **res.to_dict(),
               "seconds": seconds}
    (out / "deviation.json").write_text(json.dumps(summary, indent=2))
    deviation_curves(res, out / "deviation.png")
    print(f"data       {ds}")
    print(f"model      {args.model}; {args.n} samples, {args.solver} on {args.schedule} with {args.steps} steps, "
          f"{seconds:.2f} s")
    print(f"{'sigma':>10} " + " ".join(f"{k + ' mean':>14}" for k in DEVIATION_KINDS) + f" {'score (optimal)':>16}")
    for i, s in enumerate(res.sigmas.tolist()):
        row = " ".join(f"{float(res.kind(k).mean[i]):14.4g}" for k in DEVIATION_KINDS)
        print(f"{s:10.4g} {row} {float(res.optimal.score_mean[i]):16.4g}")
    print(f"wrote      {out / 'deviation.json'}, {out / 'deviation.png'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("deviation", help="score deviation of a model from the optimal denoiser",
                       description=__doc__.split("\n\n")[0])
    add_data_argument(p)
    add_model_arguments(p, 18)
    add_common_arguments(p, "deviation_out")
    p.set_defaults(func=run)
