"""``optden demo``: the whole story of the paper on bundled real data, in about a minute on a CPU.

1. Optimal sampling: EDM's Heun sampler driven by the exact empirical optimal denoiser
   D*, with the sampling and denoising trajectories recorded.
2. Memorization: every optimal sample lands on a training image (NN1 / NN2 < 1/3).
3. Trajectory geometry: the sampling trajectory is almost straight, the denoising
   trajectory bent; magnitudes shrink along one and grow along the other.
4. ODE-jump: stopping at sigma_stop and returning D*(x; sigma) reaches the same images
   with fewer evaluations.
5. Mean shift: ``x <- D*(x; sigma)`` climbs from noisy training images back to them;
   annealed along the schedule it reproduces the ODE samples.
6. Score deviation of stand-in models: the linear denoiser of a fitted Gaussian and a
   small torch MLP trained for a few seconds, against D*, on both trajectories.
7. What the posterior says: ESS and entropy along the optimal trajectories, and the
   top eigenvectors of the Jacobian of D* at a few of their points.
8. Locality: a small CNN trained for a few seconds against D*, LS and ELS (r^2 per sigma
   on its own trajectory, ``optden.agreement``; commands/demo_locality.py).

Writes a report folder (``--out``, default ./report): PNG figures, summary.md and
summary.json (fractions, convergence, deviation curves, timings).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ._args import make_denoiser, nonneg_int, open_dataset, out_dir, positive_int
from .demo_locality import locality_markdown, locality_section

# ---------------------------------------------------------------------------------------
# A small trained stand-in: an MLP denoiser with EDM's preconditioning.


def _tiny_denoiser_class():
    import torch

    class TinyDenoiser(torch.nn.Module):
        """MLP ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (EDM preconditioning).

        x: (B, *image_shape) model space; sigma: (B,). Returns (B, *image_shape).
        """

        def __init__(self, d: int, image_shape: tuple, sigma_data: float, hidden: int = 256):
            super().__init__()
            self.image_shape = tuple(image_shape)
            self.sigma_data = float(sigma_data)
            self.net = torch.nn.Sequential(
                torch.nn.Linear(d + 16, hidden), torch.nn.SiLU(),
                torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
                torch.nn.Linear(hidden, d),
            )
            self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(100.0), 8)))

        def forward(self, x, sigma):
            b = x.shape[0]
            x = x.reshape(b, -1)
            sigma = sigma.reshape(b, 1).to(x.dtype)
            sd2 = self.sigma_data**2
            c_skip = sd2 / (sigma**2 + sd2)
            c_out = sigma * self.sigma_data / torch.sqrt(sigma**2 + sd2)
            c_in = 1.0 / torch.sqrt(sigma**2 + sd2)
            emb = torch.log(sigma) / 4.0 * self.freqs
            h = torch.cat([c_in * x, torch.sin(emb), torch.cos(emb)], dim=1)
            return (c_skip * x + c_out * self.net(h)).reshape(b, *self.image_shape)

    return TinyDenoiser


def train_tiny_denoiser(ds, steps: int, seed: int = 0, batch: int = 128, lr: float = 2e-3,
                        max_seconds: float | None = None, hidden: int = 128, model_class=None):
    """Train a ``TinyDenoiser`` (or ``model_class(d, image_shape, sigma_data)``) on all rows of ``ds`` with EDM's weighted loss
    ``(sigma^2 + sd^2) / (sigma sd)^2 ||D(y + sigma n) - y||^2``, sigma log-uniform in
    [0.002, 80] (the sampling range). Stops after ``steps`` steps or ``max_seconds``.
    Returns (model in eval mode, last loss, steps done)."""
    import torch

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    data = ds.model_rows(torch.arange(ds.M).numpy()).to(torch.float32)
    sd = float(data.std())
    model = (model_class or _tiny_denoiser_class())(ds.d, ds.image_shape, sd, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)  # the first optimizer also imports torch._dynamo (seconds)
    lo, hi = math.log(0.002), math.log(80.0)
    loss, done, t0 = torch.tensor(math.nan), 0, time.perf_counter()
    while done < steps and (max_seconds is None or time.perf_counter() - t0 < max_seconds):
        y = data[torch.randint(0, ds.M, (batch,), generator=g)]
        sigma = torch.exp(lo + (hi - lo) * torch.rand(batch, generator=g))
        x = y + sigma[:, None] * torch.randn(y.shape, generator=g)
        w = (sigma**2 + sd**2) / (sigma * sd) ** 2
        loss = (w[:, None] * (model(x, sigma).reshape(batch, -1) - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += 1
    model.eval()
    return model, float(loss.detach()), done


# ---------------------------------------------------------------------------------------


def _fmt_s(t: float) -> str:
    return f"{t:.2f} s"


def run(args) -> int:  # noqa: C901 (a linear script: numbered steps)
    import torch

    from ..deviation import score_deviation
    from ..gaussian import GaussianDenoiser
    from ..geometry import trajectory_geometry
    from ..meanshift import annealed_mean_shift, mean_shift
    from ..memorization import memorization
    from ..plot import deviation_curves, geometry_curves, nearest_grid, trajectory_strip
    from ..sampling import sample

    t_all = time.perf_counter()
    quick = args.quick
    n = args.n if args.n is not None else (16 if quick else 64)
    steps = args.steps if args.steps is not None else (10 if quick else 18)
    train_steps = args.train_steps if args.train_steps is not None else (50 if quick else 20000)
    max_rows = args.max_rows if args.max_rows is not None else (20000 if args.data == "patches" else None)
    out = out_dir(args.out)
    timings = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        r = fn()
        timings[name] = time.perf_counter() - t0
        return r

    ds = timed("load", lambda: open_dataset(args.data, max_rows, args.seed))
    den = make_denoiser(ds, args.device, args.backend)
    print(f"data        {ds}")

    # 1-2. Optimal Heun sampling and memorization.
    run_opt = timed("optimal_sampling", lambda: sample(den, n=n, steps=steps, solver="heun", schedule="edm",
                                                       seed=args.seed, record=True))
    mem = timed("memorization", lambda: memorization(run_opt.samples, den))
    print(f"sampling    {n} samples, EDM Heun {steps} steps ({run_opt.nfe} evaluations each): "
          f"{_fmt_s(timings['optimal_sampling'])}")
    print(f"memorized   {mem.fraction:.3f} of the samples have NN1/NN2 < 1/3 "
          f"(median NN1 distance {float(mem.nn1_distance.median()):.3g})")

    # 3. Geometry.
    geo = timed("geometry", lambda: trajectory_geometry(run_opt))
    dev_mean = geo.mean("deviation")
    ratio = float(dev_mean.max() / geo.chord_length.mean())
    mag, dmag = geo.mean("magnitude"), geo.mean("denoised_magnitude")
    print(f"geometry    max deviation from the chord {float(dev_mean.max()):.3g} = {ratio:.2e} of the chord "
          f"({float(geo.chord_length.mean()):.3g}); ||x_t|| {float(mag[0]):.3g} -> {float(mag[-1]):.3g}, "
          f"||D(x_t)|| {float(dmag[0]):.3g} -> {float(dmag[-1]):.3g}")

    # 4. ODE-jump from the first grid sigma <= sigma_stop.
    run_jump = timed("ode_jump", lambda: sample(den, n=n, steps=steps, solver="heun", schedule="edm",
                                                seed=args.seed, sigma_stop=args.jump_sigma))
    mem_jump = memorization(run_jump.samples, den)
    same = float((mem_jump.nn1_index == mem.nn1_index).double().mean())
    print(f"ODE-jump    at sigma <= {args.jump_sigma:g}: {run_jump.nfe} evaluations instead of {run_opt.nfe}; "
          f"{same:.3f} reach the same training image, {mem_jump.fraction:.3f} memorized")

    # 5. Mean shift from noisy training rows, and annealed from x_T.
    g = torch.Generator().manual_seed(args.seed)
    rows = torch.randint(0, ds.M, (n,), generator=g)
    x0 = ds.images(rows.numpy()) + args.ms_sigma * torch.randn((n, *ds.image_shape), generator=g, dtype=torch.float64)
    ms = timed("mean_shift", lambda: mean_shift(den, x0, args.ms_sigma, max_iter=100, tol=1e-6))
    back = float((ms.nearest_index == rows).double().mean())
    print(f"mean shift  sigma={args.ms_sigma:g} from noisy training images: {ms.n_converged}/{n} converged, "
          f"iterations mean {float(ms.iterations.double().mean()):.1f} max {int(ms.iterations.max())}; "
          f"{back:.3f} climbed back to their own training image")
    ams = timed("annealed_mean_shift", lambda: annealed_mean_shift(den, run_opt.x_T, run_opt.sigmas))
    agree = float((ams.nearest_index == mem.nn1_index).double().mean())
    distinct_ams, distinct_heun = int(ams.nearest_index.unique().numel()), int(mem.nn1_index.unique().numel())
    print(f"annealed    mean shift from the same noise, one step x <- D*(x; sigma) per level (the Euler step "
          f"without its (sigma'/sigma)(x - D) term): {distinct_ams} distinct training images among {n} "
          f"(Heun: {distinct_heun}); {agree:.3f} agree with Heun")

    # 6. Stand-in models and their score deviation.
    gauss = timed("fit_gaussian", lambda: GaussianDenoiser.fit(ds, device=den.device))
    dev_g = timed("deviation_gaussian", lambda: score_deviation(gauss, den, n=n, steps=steps, seed=args.seed))
    mem_g = memorization(dev_g.model_run.samples, den)
    models = {"gaussian": (dev_g, mem_g, {})}
    print(f"gaussian    linear denoiser of the fitted Gaussian: {mem_g.fraction:.3f} of its samples memorized; "
          f"deviation on the optimal trajectory peaks at {float(dev_g.optimal.mean.max()):.3g} "
          f"(sigma {float(dev_g.sigmas[int(dev_g.optimal.mean.argmax())]):.3g})")
    if train_steps > 0:
        mlp, loss, done = timed("train_mlp", lambda: train_tiny_denoiser(ds, train_steps, args.seed,
                                                                        max_seconds=args.train_seconds))
        mlp = mlp.to(den.device)
        dev_m = timed("deviation_mlp", lambda: score_deviation(mlp, den, n=n, steps=steps, seed=args.seed))
        mem_m = memorization(dev_m.model_run.samples, den)
        models["mlp"] = (dev_m, mem_m, {"train_steps": done, "final_loss": loss,
                                        "train_seconds": timings["train_mlp"]})
        print(f"mlp         trained {done} steps in {_fmt_s(timings['train_mlp'])} (loss {loss:.3g}): "
              f"{mem_m.fraction:.3f} of its samples memorized; deviation on the optimal trajectory peaks at "
              f"{float(dev_m.optimal.mean.max()):.3g} (sigma {float(dev_m.sigmas[int(dev_m.optimal.mean.argmax())]):.3g})")

    # 7. Locality: a small CNN against D*, LS and ELS.
    locality = None
    if train_steps > 0 and len(ds.image_shape) == 3:
        locality, loc_figs = locality_section(ds, den, n, steps, train_tiny_denoiser, train_steps, args.cnn_seconds,
                                              args.seed, out, timings)

    # 8. Figures.
    t0 = time.perf_counter()
    figs = {}
    pictures = len(ds.image_shape) == 3 and ds.image_shape[0] in (1, 3)
    show = list(range(min(n, 4)))
    data_name = f"{args.data} (M={ds.M})"
    model_names = {"optimal": "optimal denoiser D*", "gaussian": "Gaussian linear denoiser", "mlp": "trained MLP"}
    if pictures:
        figs["trajectory"] = trajectory_strip(run_opt, out / "trajectory.png", ds, samples=show, zoom=6,
                                              sigma_labels=True, title=f"{data_name}: {model_names['optimal']}")
        figs["nearest"] = nearest_grid(run_opt, mem, ds, out / "nearest.png",
                                       title=f"{data_name}: {model_names['optimal']} | nearest training image")
        for name, (dev, m, _) in models.items():
            figs[f"trajectory_{name}"] = trajectory_strip(dev.model_run, out / f"trajectory_{name}.png", ds,
                                                          samples=show, zoom=6, sigma_labels=True,
                                                          title=f"{data_name}: {model_names[name]}")
            figs[f"nearest_{name}"] = nearest_grid(dev.model_run, m, ds, out / f"nearest_{name}.png",
                                                   title=f"{data_name}: {model_names[name]} | nearest training image")
    figs["geometry"] = geometry_curves(geo, out / "geometry.png", title=f"{data_name}: {model_names['optimal']}")
    for name, (dev, _, _) in models.items():
        figs[f"deviation_{name}"] = deviation_curves(dev, out / f"deviation_{name}.png",
                                                     title=f"{data_name}: {model_names[name]} vs D*")
    if run_opt.diagnostics is not None:
        from .posterior import report_section

        post, post_figs, post_md = timed("posterior", lambda: report_section(den, ds, run_opt, out))
        figs.update(post_figs)
    if locality is not None:
        figs.update(loc_figs)
    timings["figures"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all

    # 9. Summary.
    summary = {
        "data": {"name": args.data, "M": ds.M, "d": ds.d, "image_shape": list(ds.image_shape)},
        "device": str(den.device), "backend": getattr(den.backend, "name", str(den.backend)), "seed": args.seed,
        "sampling": {"n": n, "steps": steps, "solver": "heun", "schedule": "edm", "nfe": run_opt.nfe,
                     "fraction_memorized": mem.fraction, **mem.to_dict()},
        "ode_jump": {"sigma_stop": args.jump_sigma, "nfe": run_jump.nfe, "fraction_same_training_image": same,
                     "fraction_memorized": mem_jump.fraction},
        "ode_jump_note": "the sample is D*(x; sigma) at the first grid sigma <= sigma_stop",
        "mean_shift": {"sigma": args.ms_sigma, "n": n, "converged": ms.n_converged,
                       "iterations_mean": float(ms.iterations.double().mean()),
                       "iterations_max": int(ms.iterations.max()), "fraction_back_to_start_row": back,
                       "median_distance_to_nearest_row": float(ms.nearest_distance.median())},
        "annealed_mean_shift": {"levels": int(ams.sigmas.numel()), "fraction_same_training_image_as_heun": agree,
                                "distinct_training_images": distinct_ams, "distinct_training_images_heun": distinct_heun},
        "geometry": geo.to_dict(),
        "stand_in_models": {
            name: {"fraction_memorized": m.fraction, **extra, "deviation": dev.to_dict()}
            for name, (dev, m, extra) in models.items()
        },
        "posterior": post if run_opt.diagnostics is not None else None,
        "locality": locality,
        "figures": {k: str(Path(v).name) for k, v in figs.items()},
        "timings_seconds": timings,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    md = _markdown(summary, models)
    if run_opt.diagnostics is not None:  # before the timings table
        head, sep, tail = md.partition("## Timings")
        md = head + "\n".join(post_md) + "\n" + sep + tail
    (out / "summary.md").write_text(md)
    print(f"report      {out}/summary.md, summary.json and {len(figs)} figures; total {_fmt_s(timings['total'])}")
    return 0


def _markdown(s: dict, models: dict) -> str:
    smp, ms, jump = s["sampling"], s["mean_shift"], s["ode_jump"]
    L = [
        "# optden demo report", "",
        f"Data: `{s['data']['name']}`, M = {s['data']['M']} training images of shape {tuple(s['data']['image_shape'])}; "
        f"device {s['device']}, backend {s['backend']}, seed {s['seed']}.", "",
        "## Optimal sampling and memorization", "",
        f"EDM Heun sampler, {smp['steps']} steps ({smp['nfe']} evaluations per sample), driven by the exact "
        f"empirical optimal denoiser: **{smp['fraction_memorized']:.3f}** of {smp['n']} samples are memorized "
        f"(nearest / second-nearest training distance < 1/3; median ratio {smp['median_ratio']:.3g}).", "",
    ]
    figs = s["figures"]
    if "trajectory" in figs:
        L += ["Sampling trajectory x_t (noise to sample, upper row of each pair) over the denoising trajectory "
              "D*(x_t) (lower row):", "", f"![trajectory]({figs['trajectory']})", "",
              "Samples (left of each pair) beside their nearest training image (green frame: memorized):", "",
              f"![nearest]({figs['nearest']})", ""]
    geo = s["geometry"]
    L += ["## Trajectory geometry", "",
          f"Mean chord length ||x_0 - x_T|| = {geo['mean_chord_length']:.4g}; largest mean deviation of x_t from "
          f"the chord {max(v for v in geo['mean_deviation'] if v is not None):.4g}.", "",
          f"![geometry]({figs['geometry']})", "",
          "## ODE-jump and mean shift", "",
          f"- ODE-jump at sigma <= {jump['sigma_stop']:g}: {jump['nfe']} evaluations; "
          f"{jump['fraction_same_training_image']:.3f} reach the same training image as the full run.",
          f"- Mean shift at sigma = {ms['sigma']:g} from noisy training images: {ms['converged']}/{ms['n']} converged "
          f"(mean {ms['iterations_mean']:.1f}, max {ms['iterations_max']} iterations); "
          f"{ms['fraction_back_to_start_row']:.3f} returned to their own training image.",
          f"- Annealed mean shift from the same noise, one step x <- D*(x; sigma) per level of the schedule "
          f"({s['annealed_mean_shift']['levels']} levels; the Euler step without its (sigma'/sigma)(x - D) term): "
          f"{s['annealed_mean_shift']['distinct_training_images']} distinct training images among {smp['n']} "
          f"samples (Heun: {s['annealed_mean_shift']['distinct_training_images_heun']}); "
          f"{s['annealed_mean_shift']['fraction_same_training_image_as_heun']:.3f} agree with Heun.", "",
          "## Score deviation of stand-in models", ""]
    for name, info in s["stand_in_models"].items():
        dev = info["deviation"]
        L += [f"### {name}", "",
              f"{info['fraction_memorized']:.3f} of its samples are memorized."
              + (f" Trained {info['train_steps']} steps in {info['train_seconds']:.1f} s (final loss "
                 f"{info['final_loss']:.3g})." if "train_steps" in info else ""), "",
              "| sigma | on model trajectory | on optimal trajectory | paired | score units (optimal) |",
              "|---:|---:|---:|---:|---:|"]
        for i, sg in enumerate(dev["sigmas"]):
            L.append(f"| {sg:.4g} | {dev['model']['mean'][i]:.4g} | {dev['optimal']['mean'][i]:.4g} | "
                     f"{dev['paired']['mean'][i]:.4g} | {dev['optimal']['score_mean'][i]:.4g} |")
        L += ["", f"![deviation {name}]({figs[f'deviation_{name}']})", ""]
        if f"trajectory_{name}" in figs:
            L += ["Its own trajectories and samples beside their nearest training image:", "",
                  f"![trajectory {name}]({figs[f'trajectory_{name}']})", "",
                  f"![nearest {name}]({figs[f'nearest_{name}']})", ""]
    if s.get("locality"):
        L += locality_markdown(s["locality"], figs["agreement_cnn"])
    L += ["## Timings (seconds)", "", "| step | seconds |", "|---|---:|"]
    L += [f"| {k} | {v:.3f} |" for k, v in s["timings_seconds"].items()]
    return "\n".join(L) + "\n"


def register(sub) -> None:
    from ._args import DEMO_NAMES, positive_float

    p = sub.add_parser("demo", help="the paper's analyses on bundled real data; writes a report folder",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=DEMO_NAMES, default="digits",
                   help="bundled data set: digits (1797 8x8 digits) or patches (8x8 RGB photo patches) (default digits)")
    p.add_argument("--max-rows", type=positive_int, default=None,
                   help="random subset of the data (default: all digits, 20000 patches)")
    p.add_argument("--n", type=positive_int, default=None, help="number of samples (default 64; --quick 16)")
    p.add_argument("--steps", type=positive_int, default=None, help="Heun steps (default 18; --quick 10)")
    p.add_argument("--train-steps", type=nonneg_int, default=None,
                   help="training steps of the MLP stand-in, 0 to skip it (default 20000; --quick 50); see --train-seconds")
    p.add_argument("--train-seconds", type=positive_float, default=15.0,
                   help="time limit of the MLP training (default 15)")
    p.add_argument("--cnn-seconds", type=positive_float, default=8.0,
                   help="time limit of the CNN training of the locality section (default 8; --train-steps 0 skips it)")
    p.add_argument("--jump-sigma", type=positive_float, default=1.0, help="ODE-jump stop sigma (default 1)")
    p.add_argument("--ms-sigma", type=positive_float, default=0.3, help="mean-shift bandwidth (default 0.3)")
    p.add_argument("--quick", action="store_true", help="small run (a few seconds), for tests")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--out", default="report", help="report folder (default ./report)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.set_defaults(func=run)
