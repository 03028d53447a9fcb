"""``optden posterior``: what the posterior says at points of a data set, certified.

For each noise level (``--sigma``, one or more) and each query point: the effective
sample size, the entropy of the weights, the largest weight and the mass of the top k,
log p_sigma and d log p_sigma / d sigma, the heaviest training row, each with its
certified error bound (``OptimalDenoiser.diagnostics``); with ``--eig K``, the top K
eigenvalues of the posterior covariance (the Jacobian of D* times sigma^2) and the
residual of each pair. Query points: training rows plus noise of each sigma
(``--start data``, the default), pure noise (``--start noise``), or ``--queries FILE.npy``
(model space, (n, *shape)). Writes ``posterior.json`` and, for several sigmas,
``concentration.png`` (ESS and entropy against sigma).
"""
from __future__ import annotations

import json
import time

from ..errors import InputError
from ._args import add_common_arguments, add_data_argument, make_denoiser, open_dataset, out_dir, positive_float, positive_int


def _queries(args, ds, sigma, g_seed):
    import numpy as np
    import torch

    if args.queries is not None:
        try:
            x = torch.from_numpy(np.load(args.queries).astype(np.float64))
        except (OSError, ValueError) as exc:
            raise InputError(f"queries: cannot read {args.queries!r} as a .npy array: {exc}") from None
        return x, None
    g = torch.Generator().manual_seed(g_seed)  # the same rows and noise at every sigma
    rows = torch.randint(0, ds.M, (args.n,), generator=g)
    noise = torch.randn((args.n, *ds.image_shape), generator=g, dtype=torch.float64)
    if args.start == "noise":
        return sigma * noise, None
    return ds.images(rows.numpy()) + sigma * noise, rows


def run(args) -> int:
    import torch

    from ..plot import concentration_curves
    from ..posterior import DIAGNOSTIC_FIELDS, Diagnostics

    ds = open_dataset(args.data, args.max_rows, args.seed)
    den = make_denoiser(ds, args.device, args.backend)
    out = out_dir(args.out)
    sigmas = sorted(set(args.sigma), reverse=True)
    t0 = time.perf_counter()
    per_sigma, diags = [], []
    print(f"data        {ds}")
    print(f"{'sigma':>9} {'query':>5} {'ESS':>10} {'entropy':>9} {'max w':>9} {'top-' + str(args.k):>8} "
          f"{'log p':>11} {'dlogp/dsig':>11} {'top row':>7} {'mode':>8} certified")
    for sigma in sigmas:
        x, rows = _queries(args, ds, sigma, args.seed)
        dg = den.diagnostics(x, sigma, k=min(args.k, ds.M))
        diags.append(dg)
        entry = {"sigma": sigma, **{k: v for k, v in dg.as_dict().items() if k != "sigma"}}
        if rows is not None:
            entry["start_rows"] = rows.tolist()
        if args.eig:
            cov = den.posterior_cov(x, sigma)
            eg = cov.eig(min(args.eig, ds.d))
            entry["cov_eigenvalues"] = eg.values.tolist()
            entry["jacobian_eigenvalues"] = (eg.values / sigma**2).tolist()
            entry["eig_residuals"] = eg.residuals.tolist()
            entry["cov_bound"] = eg.bound.tolist()
            entry["cov_certified"] = cov.certified.tolist()
        per_sigma.append(entry)
        for j in range(len(dg)):
            print(f"{sigma:9.4g} {j:5d} {float(dg.ess[j]):10.4g} {float(dg.entropy[j]):9.4g} "
                  f"{float(dg.max_weight[j]):9.4g} {float(dg.top_mass[j]):8.4g} {float(dg.log_p[j]):11.5g} "
                  f"{float(dg.dlogp_dsigma[j]):11.4g} {int(dg.top_index[j]):7d} {dg.mode[j]:>8} "
                  f"{'yes' if bool(dg.certified[j]) else 'NO'}")
            if args.eig:
                vals = ", ".join(f"{v:.4g}" for v in entry["jacobian_eigenvalues"][j])
                print(f"{'':>15} Jacobian eigenvalues {vals} (max residual {max(entry['eig_residuals'][j]):.2g})")
    seconds = time.perf_counter() - t0
    summary = {"data": args.data, "M": ds.M, "d": ds.d, "start": "file" if args.queries else args.start,
               "k": args.k, "seed": args.seed, "fields": list(DIAGNOSTIC_FIELDS), "tol": den.tol,
               "per_sigma": per_sigma, "seconds": seconds}
    (out / "posterior.json").write_text(json.dumps(summary, indent=2))
    wrote = [out / "posterior.json"]
    if len(sigmas) > 1 and len({len(d) for d in diags}) == 1:
        wrote.append(concentration_curves(Diagnostics.stack(diags), out / "concentration.png"))
    n_bad = sum(int((~d.certified).sum()) for d in diags)
    print(f"certified   {sum(len(d) for d in diags) - n_bad}/{sum(len(d) for d in diags)} within the contract "
          f"(tol {den.tol:g}); {seconds:.2f} s")
    print(f"wrote       {', '.join(str(p) for p in wrote)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("posterior", help="certified posterior diagnostics (ESS, entropy, top mass, log p) and "
                                         "covariance eigenvalues at points of a data set",
                       description=__doc__.split("\n\n")[0])
    add_data_argument(p)
    p.add_argument("--sigma", type=positive_float, nargs="+", required=True, help="one or more noise levels")
    p.add_argument("--start", choices=("data", "noise"), default="data",
                   help="query points: training rows + sigma * noise, or sigma * noise (default data)")
    p.add_argument("--queries", default=None, help="a .npy file of model-space query points (n, *shape)")
    p.add_argument("--k", type=positive_int, default=10, help="top-mass count (default 10)")
    p.add_argument("--eig", type=positive_int, default=None,
                   help="also the top EIG eigenvalues of the posterior covariance (Lanczos) with residuals")
    add_common_arguments(p, "posterior_out")
    p.set_defaults(n=8, func=run)


# ---------------------------------------------------------------------------------------
# The demo report's section (optden demo): concentration along the optimal trajectories and
# the top eigenvectors of the Jacobian of D* at a few of their points.


def report_section(den, ds, run, out, samples: int = 3, points: int = 4, k: int = 4):
    """(summary dict, {figure name: path}, markdown lines) for a ``SampleRun`` recorded with
    its diagnostics: ESS and entropy against sigma, and the top k eigenvectors of dD*/du
    (= Cov / sigma^2) as images at up to ``points`` steps of the first ``samples`` samples,
    steps before the posterior collapsed onto one image (max weight < 0.999)."""
    import torch

    from ..plot import concentration_curves, eigenvector_images

    dg = run.diagnostics
    figs = {"concentration": concentration_curves(dg, out / "concentration.png")}
    show = list(range(min(samples, run.samples.shape[0])))
    open_steps = [i for i in range(dg.max_weight.shape[0]) if bool((dg.max_weight[i, show] < 0.999).all())]
    steps = [open_steps[int(round(float(t)))] for t in torch.linspace(0, len(open_steps) - 1, min(points, len(open_steps)))]
    eig_rows, summary_eig = [], []
    if steps and len(ds.image_shape) == 3 and ds.image_shape[0] in (1, 3):
        x = torch.stack([run.trajectory[i][s] for s in show for i in steps])
        sig = torch.tensor([float(run.eval_sigmas[i]) for _ in show for i in steps], dtype=torch.float64)
        eg = den.posterior_cov(x, sig).eig(min(k, ds.d))
        jac = eg.values.cpu() / sig[:, None] ** 2
        labels = [f"#{s} σ={float(run.eval_sigmas[i]):.2g}" for s in show for i in steps]
        figs["jacobian_eigenvectors"] = eigenvector_images(eg.vectors.cpu(), ds.image_shape,
                                                           out / "jacobian_eigenvectors.png", row_labels=labels,
                                                           col_labels=[f"v{j + 1}" for j in range(eg.values.shape[1])])
        for r, lab in enumerate(labels):
            summary_eig.append({"point": lab, "sigma": float(sig[r]), "jacobian_eigenvalues": jac[r].tolist(),
                                "residuals": eg.residuals[r].tolist(), "cov_bound": float(eg.bound[r])})
            eig_rows.append(f"| {lab} | " + ", ".join(f"{v:.3g}" for v in jac[r].tolist())
                            + f" | {float(eg.residuals[r].max()):.1e} |")
    summary = {"sigmas": dg.sigma[:, 0].tolist(), "ess_mean": dg.ess.mean(1).tolist(),
               "entropy_mean": dg.entropy.mean(1).tolist(), "max_weight_mean": dg.max_weight.mean(1).tolist(),
               "fraction_certified": float(dg.certified.double().mean()), "jacobian_eigen": summary_eig}
    md = ["## What the posterior says", "",
          "Certified diagnostics along the optimal trajectories (from the pass that computes D*): the effective "
          "sample size 1 / sum w^2 and the entropy of the weights fall from the whole data set to one training "
          f"image as sigma falls (the memorization alarm; {summary['fraction_certified']:.3f} of them within the "
          "contract).", "", f"![concentration]({figs['concentration'].name})", ""]
    if eig_rows:
        md += ["Top eigenvectors of the Jacobian dD*/du = Cov[y | u] / sigma^2 (one row per sample and step, red > 0 "
               "> blue): the directions D* still responds to.", "",
               f"![jacobian eigenvectors]({figs['jacobian_eigenvectors'].name})", "",
               "| point | Jacobian eigenvalues | max residual |", "|---|---|---:|", *eig_rows, ""]
    return summary, figs, md
