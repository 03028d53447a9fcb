"""``optden deviation``: empirical score deviation of a model from the optimal denoiser.

The model (``--model``), in the data set's model space, is one of:

* ``gaussian``: the closed-form linear denoiser of a Gaussian fitted to the data (the
  classic generalizing baseline);
* a diffusers folder (``save_pretrained``): a pipeline's (``model_index.json`` with
  ``unet/`` and ``scheduler/``) or a UNet's with its ``scheduler_config.json`` beside it;
  its prediction becomes D(x; sigma) by the scheduler's own conventions
  (``optden.integrations.diffusers``);
* a saved torch module whose forward is ``D(x, sigma)`` (x (B, *image_shape), sigma (B,)):
  a ``torch.export.save`` archive (``.pt2``; a static batch dimension is handled by
  calling it in padded chunks) or TorchScript (``torch.jit.save``).

Writes ``deviation.json`` (per sigma: mean, std, quantiles of
``||D_theta - D*||`` and of the score difference, on the model's trajectory, on the
optimal trajectory, and paired) and ``deviation.png``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ._args import add_common_arguments, add_data_argument, add_model_arguments, make_denoiser, open_dataset, out_dir
from ..errors import InputError


def load_model(spec: str, ds, device: str, batch_size: int | None = None, label: int | None = None):
    """``gaussian`` -> ``GaussianDenoiser.fit(ds)`` (of the rows of class ``label``, when
    given: called as ``D(x, sigma, labels)`` like the class-conditional D*); a folder -> a diffusers model
    (``optden.integrations.diffusers.load_denoiser``); a file -> a saved module
    (``optden.integrations.export.load_module``: ``.pt2`` or TorchScript)."""
    from ..gaussian import GaussianDenoiser
    from ..integrations.export import load_module

    if spec == "gaussian":
        if label is None:
            return GaussianDenoiser.fit(ds, device=device)
        gauss = GaussianDenoiser.fit(ds.subset(ds.rows_with_label(label)), device=device)
        return lambda x, sigma, labels=None: gauss(x, sigma)
    path = Path(spec)
    if path.is_dir():
        from ..integrations.diffusers import load_denoiser

        return load_denoiser(path, device=device, batch_size=batch_size)
    if not path.is_file():
        raise InputError(f"model: expected 'gaussian', a diffusers folder or a saved module (.pt2 or TorchScript); "
                         f"{spec!r} does not exist")
    return load_module(path, device)


def run(args) -> int:
    from ..deviation import DEVIATION_KINDS, score_deviation
    from ..plot import deviation_curves

    ds = open_dataset(args.data, args.max_rows, args.seed, args.split, args.layout)
    den = make_denoiser(ds, args.device, args.backend)
    model = load_model(args.model, ds, args.device, args.batch_size, args.label)
    out = out_dir(args.out)
    t0 = time.perf_counter()
    res = score_deviation(model, den, n=args.n, steps=args.steps, solver=args.solver, schedule=args.schedule,
                          seed=args.seed, labels=args.label, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    summary = {"data": args.data, "M": ds.M, "d": ds.d, "model_spec": args.model, "seed": args.seed,
               "label": args.label, **res.to_dict(), "seconds": seconds}
    (out / "deviation.json").write_text(json.dumps(summary, indent=2))
    deviation_curves(res, out / f"deviation.{args.format}", title=f"{args.data} (M={ds.M}): {args.model} vs D*")
    print(f"data       {ds}")
    print(f"model      {args.model}; {args.n} samples, {args.solver} on {args.schedule} with {args.steps} steps, "
          f"{seconds:.2f} s")
    print(f"{'sigma':>10} " + " ".join(f"{k + ' mean':>14}" for k in DEVIATION_KINDS) + f" {'score (optimal)':>16}")
    for i, s in enumerate(res.sigmas.tolist()):
        row = " ".join(f"{float(res.kind(k).mean[i]):14.4g}" for k in DEVIATION_KINDS)
        print(f"{s:10.4g} {row} {float(res.optimal.score_mean[i]):16.4g}")
    print(f"wrote      {out / 'deviation.json'}, {out / ('deviation.' + args.format)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("deviation", help="score deviation of a model from the optimal denoiser",
                       description=__doc__.split("\n\n")[0])
    add_data_argument(p)
    add_model_arguments(p, 18)
    add_common_arguments(p, "deviation_out")
    p.set_defaults(func=run)
