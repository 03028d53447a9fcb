"""Posterior diagnostics (issue 20): ESS, entropy, top weights, log p and d log p / d sigma
from the pass that computes D*, each certified, against the float64 oracle
(``optden.reference.diagnostics``) and, for the bounds, against long double."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import optden
from optden import reference as R
from optden.engine import dispatch, precision
from optden.engine.partial import Partial
from optden.engine.rows import RowSource
from optden.posterior import DIAGNOSTIC_FIELDS
from test_precision import centered, exact_logits, queries
from tolerances import DIAGNOSTIC_RTOL, SIGMAS, diagnostic_scale, model_rows

CPU = torch.device("cpu")


def check_against_oracle(dg, x, y, sigma, k):
    """Every field within the contract of the oracle, and within its own certified bound
    (plus the float64 oracle's own rounding, 1e-12 of the contract's scale)."""
    ref = R.diagnostics(x, y, sigma, k=k)
    d = y.shape[1]
    for name in DIAGNOSTIC_FIELDS:
        val, bound = getattr(dg, name).numpy(), getattr(dg, name + "_err").numpy()
        scale = diagnostic_scale(name, ref[name], d, sigma)
        err = np.abs(val - ref[name])
        assert (err <= DIAGNOSTIC_RTOL * scale).all(), (name, sigma, err / scale)
        assert (err <= bound + 1e-12 * scale).all(), (name, sigma, err, bound)
    assert bool(dg.certified.all()), (sigma, dg.mode)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("data", ["digits_u8", "faces_u8"])
def test_contract_real_images(data, backend, request, rng):
    ds = optden.Dataset.from_array(request.getfixturevalue(data))
    den = optden.OptimalDenoiser(ds, backend=backend)
    y = model_rows(ds)
    for sigma in SIGMAS:
        x = queries(y, sigma, rng, n=2)
        dg = den.diagnostics(torch.from_numpy(x), sigma, k=5)
        check_against_oracle(dg, x, y, sigma, 5)
        w = R.weights(x, y, sigma)  # the heaviest row (any of tied ones: faces has repeated patches)
        assert (w[np.arange(len(x)), dg.top_index.numpy()] >= w.max(1) * (1 - 1e-9)).all()
        assert np.abs(dg.denoised.numpy() - R.denoise(x, y, sigma)).max() <= 1e-5 * np.abs(y).max() * 10


def long_double_stats(lg: np.ndarray, k: int) -> dict:
    """ESS, entropy, A, lse and top masses of extended-precision logits (N, M), relative to the top row."""
    top = lg.max(1, keepdims=True)
    x = top - lg
    e = np.exp(-x)
    S = e.sum(1)
    R_ = S - 1.0  # the top row's own term is exactly 1
    w = e / S[:, None]
    mean_gap = (w * x).sum(1)
    ws = -np.sort(-w, axis=1)
    return {"ess": S**2 / np.exp(-2 * x).sum(1), "entropy": np.log1p(R_) + mean_gap,
            "neglogit": -top[:, 0] + mean_gap, "lse": top[:, 0] + np.log1p(R_), "T1": ws[:, 0],
            "Tk": ws[:, :k].sum(1)}


@pytest.mark.parametrize("data", ["digits_u8", "faces_u8"])
def test_bounds_hold_in_extended_precision(data, request, rng):
    """Every certified interval contains the truth computed in long double (the mode that
    certified it: dense on the cpu and torch passes, rescored at small sigma, exact)."""
    ds = optden.Dataset.from_array(request.getfixturevalue(data))
    y = model_rows(ds)
    seen = set()
    for sigma in (1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3):
        x = queries(y, sigma, rng, n=2)
        src, v, coef = centered(ds, x, sigma)
        truth = long_double_stats(exact_logits(v, coef, ds), 5)
        for name in ("cpu", "torch"):
            p = dispatch.get(name).partial(v, coef, src, 32, stats=True)
            cert = precision.certify(p, v, coef, src, precision.DEFAULT_TOL)
            seen.update(cert.mode.tolist())
            st = cert.stats
            for key in ("ess", "entropy", "neglogit", "lse"):
                t = truth[key].astype(np.float64)
                slack = 1e-15 * np.maximum(np.abs(t), 1.0)
                assert (getattr(st, key + "_lo").numpy() <= t + slack).all(), (name, sigma, key)
                assert (t - slack <= getattr(st, key + "_hi").numpy()).all(), (name, sigma, key)
            for kk, key in ((1, "T1"), (5, "Tk")):
                _, lo, hi = st.top_mass(kk)
                t = truth[key].astype(np.float64)
                assert (lo.numpy() <= t * (1 + 1e-15)).all() and (t * (1 - 1e-15) <= hi.numpy()).all(), (sigma, kk)
    assert {precision.DENSE, precision.RESCORED} <= seen


def test_exact_mode_statistics(digits_u8, rng):
    """A query the exact float64 pass certifies (many near-tied rows beyond the top K)."""
    base = digits_u8[:40]
    ds = optden.Dataset.from_array(np.concatenate([np.repeat(base[:1], 70, axis=0), base[1:]]))
    y = model_rows(ds)
    x = y[:1] + 1e-4 * rng.standard_normal((1, ds.d))
    den = optden.OptimalDenoiser(ds, backend="torch", topk=8)
    dg = den.diagnostics(torch.from_numpy(x), 1e-3)
    assert dg.mode == ["exact"]
    check_against_oracle(dg, x, y, 1e-3, 10)
    assert abs(float(dg.ess[0]) - 70.0) <= 1e-9 * 70


def test_limits(digits_u8, rng):
    # sigma -> 0 on a unique nearest row: ESS -> 1, all weight on it, entropy -> 0
    ds = optden.Dataset.from_array(digits_u8)
    den = optden.OptimalDenoiser(ds)
    y = model_rows(ds)
    i = rng.integers(0, ds.M, 4)
    x = torch.from_numpy(y[i] + 1e-4 * rng.standard_normal((4, ds.d)))
    dg = den.diagnostics(x, 1e-3)
    assert np.array_equal(dg.top_index.numpy(), i) or len(np.unique(y[i], axis=0)) < 4
    assert torch.all((dg.ess - 1).abs() <= 1e-12) and torch.all(dg.entropy <= 1e-12)
    assert torch.all((dg.max_weight - 1).abs() <= 1e-12)
    # duplicated rows: ESS -> number of copies, entropy -> log(copies), top-copies mass -> 1
    for copies in (2, 3, 5):
        raw = np.concatenate([np.repeat(digits_u8[:1], copies, axis=0), digits_u8[1:300]])
        dd = optden.Dataset.from_array(raw)
        yy = model_rows(dd)
        dg = optden.OptimalDenoiser(dd).diagnostics(torch.from_numpy(yy[:1] + 1e-5 * rng.standard_normal((1, dd.d))),
                                                   2e-3, k=copies)
        assert abs(float(dg.ess[0]) - copies) <= 1e-9 * copies
        assert abs(float(dg.entropy[0]) - math.log(copies)) <= 1e-9
        assert abs(float(dg.max_weight[0]) - 1.0 / copies) <= 1e-9 and abs(float(dg.top_mass[0]) - 1.0) <= 1e-9
        assert int(dg.top_index[0]) < copies
    # sigma -> infinity: uniform weights, ESS -> M, entropy -> log M, d log p / d sigma -> -d / sigma
    dg = den.diagnostics(x, 1e8)
    assert torch.all((dg.ess - ds.M).abs() <= 1e-9 * ds.M)
    assert torch.all((dg.entropy - math.log(ds.M)).abs() <= 1e-9)
    assert torch.all((dg.dlogp_dsigma * 1e8 + ds.d).abs() <= 1e-6 * ds.d)


def test_class_conditional(digits_u8, rng):
    from sklearn.datasets import load_digits

    labels = load_digits().target
    ds = optden.Dataset.from_array(digits_u8, labels=labels, num_classes=10)
    den = optden.OptimalDenoiser(ds)
    y = model_rows(ds)
    x = y[:6] + 0.5 * rng.standard_normal((6, ds.d))
    lab = labels[:6]
    dg = den.diagnostics(torch.from_numpy(x), 0.5, torch.from_numpy(lab), k=3)
    for j in range(6):
        rows = np.nonzero(labels == lab[j])[0]
        ref = R.diagnostics(x[j:j + 1], y[rows], 0.5, k=3)
        for name in DIAGNOSTIC_FIELDS:
            scale = diagnostic_scale(name, ref[name], ds.d, 0.5)
            assert np.abs(float(getattr(dg, name)[j]) - ref[name]) <= DIAGNOSTIC_RTOL * scale
        assert int(dg.top_index[j]) == rows[ref["top_index"][0]]
    # log p of the class matches log_density with the same labels
    lp = den.log_density(torch.from_numpy(x), 0.5, torch.from_numpy(lab))
    assert torch.allclose(dg.log_p, lp, rtol=1e-9, atol=1e-9)


def test_partial_statistics_accumulate_exactly(rng):
    """absorb over blocks gives the same s2 and e1 as one sum, whatever the block order;
    the cpu pass's equal the torch pass's; split states refuse them."""
    n, M = 3, 500
    lg = torch.from_numpy(-rng.random((n, M)) * 50)
    rows = torch.zeros(M, 2, dtype=torch.float64)
    one = Partial.empty(n, 2, 4, CPU, stats=True)
    one.absorb(lg, rows)
    blocks = Partial.empty(n, 2, 4, CPU, stats=True)
    for a in (300, 0, 150, 450):  # the running max moves
        blocks.absorb(lg[:, a:a + 150], rows[a:a + 150], a)
    m = lg.max(1).values
    p = torch.exp(lg - m[:, None])
    for part in (one, blocks):
        scale = torch.exp(part.m - m)
        assert torch.allclose(part.s2 * scale**2, (p * p).sum(1), rtol=1e-13)
        assert torch.allclose(part.e1 * scale + part.s * scale * (part.m - m), (p * (lg - m[:, None])).sum(1), rtol=1e-12)
    with pytest.raises(ValueError, match="pass statistics"):
        one.absorb_splits(one.m[None], one.s[None], one.acc[None])


@pytest.mark.parametrize("sigma", [0.05, 1.0, 30.0])
def test_cpu_pass_statistics_match_torch(faces_u8, sigma, rng):
    ds = optden.Dataset.from_array(faces_u8)
    y = model_rows(ds)
    x = y[rng.integers(0, ds.M, 5)] + sigma * rng.standard_normal((5, ds.d))
    src, v, coef = centered(ds, x, sigma)
    a = dispatch.get("cpu").partial(v, coef, src, 8, stats=True)
    b = dispatch.get("torch").partial(v, coef, src, 8, stats=True)
    for p in (a, b):
        p.P, p.H = p.s2 / p.s**2, torch.log(p.s) - p.e1 / p.s
    assert torch.allclose(a.P, b.P, rtol=1e-6) and torch.allclose(a.H, b.H, rtol=1e-6, atol=1e-6)
    assert a.left_out is not None and bool((a.left_out >= 0).all())


def test_recorded_along_a_trajectory(digits_u8):
    ds = optden.Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8))
    den = optden.OptimalDenoiser(ds)
    run = optden.sample(den, n=5, steps=6, solver="euler", record=True, batch_size=3)
    dg = run.diagnostics
    assert dg.ess.shape == (6, 5) and dg.denoised.shape == (6, 5, 64) and len(dg.mode) == 6
    assert torch.equal(dg.denoised.reshape(run.denoised.shape), run.denoised)
    assert torch.equal(dg.sigma[:, 0], run.eval_sigmas)
    i = 3  # the same numbers as a direct call at that point of the trajectory
    direct = den.diagnostics(run.trajectory[i], float(run.eval_sigmas[i]))
    assert torch.allclose(direct.ess, dg.ess[i], rtol=1e-12) and torch.equal(direct.top_index, dg.top_index[i])
    # the memorization alarm: at the end every sample sits on one training image
    assert torch.all((dg.max_weight[-1] - 1).abs() < 1e-6) and torch.all((dg.ess[-1] - 1).abs() < 1e-6)
    assert optden.sample(den, n=2, steps=3, record=True, diagnostics=False).diagnostics is None
    assert optden.sample(den, n=2, steps=3).diagnostics is None


def test_pure_noise(digits_u8, rng):
    """sigma = inf (a flow-matching grid's first point): uniform weights over the (class's)
    rows, known exactly, beside finite sigmas in one call, and recorded along such a grid."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    ds = optden.Dataset.from_array(digits_u8, labels=labels, num_classes=10)
    den = optden.OptimalDenoiser(ds)
    y = model_rows(ds)
    x = torch.from_numpy(y[:4] + 0.3 * rng.standard_normal((4, ds.d)))
    sig = torch.tensor([0.5, math.inf, 2.0, math.inf], dtype=torch.float64)
    dg = den.diagnostics(x, sig, k=3)
    finite = den.diagnostics(x[[0, 2]], sig[[0, 2]], k=3)
    for name in DIAGNOSTIC_FIELDS:
        assert torch.equal(getattr(dg, name)[[0, 2]], getattr(finite, name)), name
    pure = [1, 3]
    assert torch.equal(dg.ess[pure], torch.full((2,), float(ds.M), dtype=torch.float64))
    assert torch.allclose(dg.entropy[pure], torch.full((2,), math.log(ds.M), dtype=torch.float64), rtol=1e-15)
    assert torch.allclose(dg.top_mass[pure], torch.full((2,), 3.0 / ds.M, dtype=torch.float64), rtol=1e-15)
    assert torch.all(dg.log_p[pure] == -math.inf) and torch.all(dg.dlogp_dsigma[pure] == 0)
    assert bool(dg.certified.all()) and dg.mode[1] == dg.mode[3] == "exact"
    assert torch.allclose(dg.denoised[pure], torch.from_numpy(y.mean(0)).expand(2, -1), atol=1e-12)
    # the limit: a finite sigma far above the data's spread gives the same numbers to the contract
    far = den.diagnostics(x[pure], 1e9, k=3)
    for name in ("ess", "entropy", "max_weight", "top_mass"):
        assert torch.allclose(getattr(far, name), getattr(dg, name)[pure], rtol=DIAGNOSTIC_RTOL), name
    # class-conditional: uniform over the class's rows
    lab = torch.tensor([3, 7])
    dc = den.diagnostics(x[:2], math.inf, lab)
    counts = torch.tensor([float((labels == c).sum()) for c in (3, 7)], dtype=torch.float64)
    assert torch.equal(dc.ess, counts) and all(labels[int(i)] == c for i, c in zip(dc.top_index, (3, 7)))
    # a flow-matching grid starts at sigma = inf: its first record is the uniform posterior
    run = optden.sample(optden.OptimalDenoiser(optden.Dataset.from_array(digits_u8)), n=2, steps=4, record=True,
                        schedule=optden.get_schedule("flow", 4, eps=0))
    assert float(run.diagnostics.sigma[0, 0]) == math.inf and torch.all(run.diagnostics.ess[0] == ds.M)
    assert torch.all(run.diagnostics.ess[1:] < ds.M)


def test_bad_arguments(digits_u8):
    den = optden.OptimalDenoiser(optden.Dataset.from_array(digits_u8[:20]))
    x = torch.zeros(2, 64, dtype=torch.float64)
    with pytest.raises(optden.InputError, match="k:"):
        den.diagnostics(x, 1.0, k=21)
    with pytest.raises(optden.DtypeError, match="k:"):
        den.diagnostics(x, 1.0, k=2.0)
    with pytest.raises(optden.InputError, match="sigma"):
        den.diagnostics(x, -1.0)
    with pytest.raises(optden.InputError, match="x:"):
        den.diagnostics(torch.zeros(2, 63), 1.0)
    with pytest.raises(optden.InputError, match="diagnostics"):
        optden.sample(lambda x, s: x, n=1, shape=(4,), steps=2, record=True, diagnostics=True)


def test_posterior_command(tmp_path, capsys):
    import json

    from PIL import Image

    from optden.cli import main

    out = tmp_path / "post"
    assert main(["posterior", "digits", "--sigma", "0.05", "1", "20", "--n", "3", "--eig", "2", "--k", "4",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "certified   9/9" in printed and "Jacobian eigenvalues" in printed
    s = json.loads((out / "posterior.json").read_text())
    assert [e["sigma"] for e in s["per_sigma"]] == [20.0, 1.0, 0.05]
    small = s["per_sigma"][-1]
    assert all(abs(e - 1) < 1e-9 for e in small["ess"]) and small["top_index"] == small["start_rows"]
    assert len(s["per_sigma"][0]["jacobian_eigenvalues"][0]) == 2
    with Image.open(out / "concentration.png") as im:
        assert im.format == "PNG"
    assert main(["posterior", "digits", "--sigma", "0.5", "--queries", str(tmp_path / "missing.npy"),
                 "--out", str(out)]) == 2
    assert "queries" in capsys.readouterr().err


def test_plots_take_axes(digits_u8, tmp_path):
    from matplotlib.figure import Figure

    from optden.plot import concentration_curves, eigenvector_images

    ds = optden.Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8))
    den = optden.OptimalDenoiser(ds)
    x = torch.from_numpy(model_rows(ds)[:2])
    dg = optden.posterior.Diagnostics.stack([den.diagnostics(x, s) for s in (10.0, 1.0, 0.1)])
    fig = Figure()
    axes = fig.subplots(1, 3)
    assert concentration_curves(dg, ax=axes[:2]) == list(axes[:2])
    eg = den.posterior_cov(x, 1.0).eig(3)
    assert eigenvector_images(eg.vectors, ds.image_shape, ax=axes[2]) is axes[2]
    assert concentration_curves(dg, tmp_path / "c.png").is_file()
    assert eigenvector_images(eg.vectors, ds.image_shape, tmp_path / "e.png").is_file()
    with pytest.raises(optden.InputError, match="ax"):
        concentration_curves(dg, ax=axes[0])
    with pytest.raises(optden.InputError, match="image_shape"):
        eigenvector_images(eg.vectors, (1, 4, 4))


def test_far_queries(digits_u8):
    """Far from the data (|u| ~ 2.4e4, logits ~ 1e8 nats and more) the exact float64 pass's
    uniform logit error alone put the ESS bound over the contract (1.03e-6 at sigma 1, cpu
    pass); the same pass's top K relative to its top row is tight. 24 far queries a sigma,
    from a fixed generator: these draws send 3 queries to the exact pass at sigma 3 (whether
    a far query needs it depends on the draw; a session's random ones often do not)."""
    ds = optden.Dataset.from_array(digits_u8)
    y = model_rows(ds)
    den = optden.OptimalDenoiser(ds, backend="cpu")
    rng = np.random.default_rng(5)
    modes = set()
    for sigma in (0.3, 1.0, 3.0):
        x = 3e3 * rng.standard_normal((24, ds.d))
        dg = den.diagnostics(torch.from_numpy(x), sigma, k=3)
        modes |= set(dg.mode)
        check_against_oracle(dg, x, y, sigma, 3)
    assert "exact" in modes, modes
