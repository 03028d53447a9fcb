"""LocalDenoiser (LS, ELS, patch composite) against the float64 oracles of optden.reference.local.

Real images (sklearn digits 1x8x8, photo crops 3x7x9 from scikit-image's pictures) and
random ones; sigma 1e-3..1e3; both paddings; class-conditional; the compiled (cpu) and
torch passes; the certificate's fallback; sampling; the patch-size schedules; errors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optden
from optden import reference as R
from optden.engine import patch_cpu
from optden.engine.precision import MODE_NAMES
from optden.local import LocalDenoiser
from tolerances import DENOISE_RTOL, SIGMAS, rel_err

ORACLES = {"local": R.local_denoise, "equivariant": R.equivariant_denoise, "composite": R.composite_denoise}
BACKENDS = ["cpu", "torch"] if patch_cpu.available() else ["torch"]
# The oracle is float64 direct differences too, in model space: its logits carry the same
# relative rounding as the passes' (bounds.direct_pass_delta), so it may itself be off by up
# to the certified bound (plus 1e-13 for the model-space conversion): the difference from
# it is checked against twice the bound.
ORACLE_SLACK = 1e-13


def crops(n: int, shape=(3, 7, 9), seed: int = 0) -> np.ndarray:
    """n uint8 images (C, H, W) cut at random places from the bundled photographs."""
    from optden.data.demo import source_pictures

    pics = [p for _, p in source_pictures()]
    rng = np.random.default_rng(seed)
    out = np.empty((n, *shape), dtype=np.uint8)
    for j in range(n):
        p = pics[j % len(pics)]
        y0, x0 = rng.integers(0, p.shape[0] - shape[1]), rng.integers(0, p.shape[1] - shape[2])
        out[j] = p[y0 : y0 + shape[1], x0 : x0 + shape[2]].transpose(2, 0, 1)
    return out


@pytest.fixture(scope="module")
def digits_ds(digits_u8):
    return optden.Dataset.from_array(digits_u8[:120].reshape(-1, 1, 8, 8),
                                     labels=np.arange(120) % 3)


@pytest.fixture(scope="module")
def photo_ds():
    return optden.Dataset.from_array(crops(90))


def queries(ds, sigma: float, rng, n: int = 2) -> np.ndarray:
    """y_i + sigma n (n of them) and one pure-noise image, model space (n + 1, C, H, W)."""
    y = ds.images(rng.integers(0, ds.M, n)).numpy()
    near = y + sigma * rng.standard_normal(y.shape)
    noise = max(sigma, 1.0) * rng.standard_normal((1, *y.shape[1:]))
    return np.concatenate([near, noise])


def check(ev, ref, kind=""):
    """The contract: relative error of each image and the per-position bound never exceeded."""
    out = ev.denoised.numpy()
    assert not np.isnan(out).any()
    assert rel_err(out, ref) <= DENOISE_RTOL, kind
    pix_err = np.sqrt(((out - ref) ** 2).sum(1))  # (B, H, W)
    assert (pix_err <= 2.0 * ev.error.numpy() + ORACLE_SLACK).all(), (kind, float((pix_err - ev.error.numpy()).max()))
    assert (ev.bound.numpy() >= 0).all() and not torch.isnan(ev.error).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("kind", ["local", "composite"])
@pytest.mark.parametrize("data", ["digits_ds", "photo_ds"])
def test_contract_local_and_composite(data, kind, padding, backend, request, rng):
    ds = request.getfixturevalue(data)
    y = ds.images(np.arange(ds.M)).numpy()
    den = LocalDenoiser(ds, 3, kind=kind, padding=padding, backend=backend)
    for sigma in SIGMAS:
        x = queries(ds, sigma, rng)
        ev = den.denoise_certified(torch.from_numpy(x), sigma)
        check(ev, ORACLES[kind](x, y, sigma, 3, padding), f"{kind} {padding} {sigma}")
        assert set(ev.modes()) == {"dense"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["circular", "zero"])
@pytest.mark.parametrize("data", ["digits_ds", "photo_ds"])
def test_contract_equivariant(data, padding, backend, request, rng):
    ds = request.getfixturevalue(data).subset(np.arange(30))  # the oracle compares M * HW patches
    y = ds.images(np.arange(ds.M)).numpy()
    den = LocalDenoiser(ds, 3, kind="equivariant", padding=padding, backend=backend)
    for sigma in (1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3):
        x = queries(ds, sigma, rng, n=1)
        ev = den.denoise_certified(torch.from_numpy(x), sigma)
        check(ev, R.equivariant_denoise(x, y, sigma, 3, padding), f"{padding} {sigma}")


@pytest.mark.parametrize("k", [1, 5, 7])
@pytest.mark.parametrize("kind", ["local", "equivariant", "composite"])
def test_odd_sizes_and_patch_sizes(kind, k, photo_ds, rng):
    ds = photo_ds.subset(np.arange(25 if kind == "equivariant" else 90))
    y = ds.images(np.arange(ds.M)).numpy()
    for padding in ("circular", "zero"):
        den = LocalDenoiser(ds, k, kind=kind, padding=padding)
        for sigma in (3e-3, 0.3, 30.0):
            x = queries(ds, sigma, rng, n=1)
            check(den.denoise_certified(torch.from_numpy(x), sigma), ORACLES[kind](x, y, sigma, k, padding), kind)


def test_covering_patch_is_the_optimal_denoiser(digits_ds, rng):
    """With zero padding and k >= 2 max(H, W) - 1 every window holds the whole image: LS,
    ELS and the composite are D* exactly."""
    ds = digits_ds
    y = ds.model_rows(np.arange(ds.M)).numpy()
    dstar = optden.OptimalDenoiser(ds, backend="torch")
    for sigma in (1e-3, 0.1, 1.0, 100.0):
        x = queries(ds, sigma, rng)
        ref = R.denoise(x.reshape(len(x), -1), y, sigma)
        assert rel_err(R.local_denoise(x, y.reshape(-1, 1, 8, 8), sigma, 15, "zero"), ref) <= 1e-12
        for kind in ("local", "equivariant", "composite"):
            out = LocalDenoiser(ds, 15, kind=kind, padding="zero")(torch.from_numpy(x), sigma)
            assert rel_err(out, ref) <= DENOISE_RTOL, kind
            assert rel_err(out, dstar(torch.from_numpy(x), sigma)) <= DENOISE_RTOL, kind


def test_class_conditional(digits_ds, rng):
    ds = digits_ds
    y = ds.images(np.arange(ds.M)).numpy()
    labels = np.array([0, 2, 1, 2])
    sigma = 0.2
    x = y[[3, 5, 7, 8]] + sigma * rng.standard_normal((4, 1, 8, 8))
    for kind in ("local", "equivariant", "composite"):
        den = LocalDenoiser(ds, 3, kind=kind, padding="zero")
        ev = den.denoise_certified(torch.from_numpy(x), sigma, class_labels=torch.from_numpy(labels))
        ref = np.concatenate([ORACLES[kind](x[j : j + 1], y[ds.labels == c], sigma, 3, "zero")
                              for j, c in enumerate(labels)])
        check(ev, ref, kind)
        one_hot = np.eye(3)[labels]  # EDM's class vectors give the same
        torch.testing.assert_close(den(torch.from_numpy(x), sigma, torch.from_numpy(one_hot)), ev.denoised)


@pytest.mark.parametrize("kind", ["local", "equivariant", "composite"])
def test_certificate_fallback(kind, photo_ds, rng):
    """A tolerance below what any pass reaches sends every position to the engine's own
    certification over its patches (torch backend + certify): still the oracle's result,
    now with modes rescored or exact and their bounds."""
    ds = photo_ds.subset(np.arange(12))
    y = ds.images(np.arange(ds.M)).numpy()
    for padding, sigma in (("circular", 2e-3), ("zero", 0.5)):
        den = LocalDenoiser(ds, 3, kind=kind, padding=padding, tol=1e-16)
        x = queries(ds, sigma, rng, n=1)
        ev = den.denoise_certified(torch.from_numpy(x), sigma)
        check(ev, ORACLES[kind](x, y, sigma, 3, padding), kind)
        assert set(ev.modes()) <= {"rescored", "exact", "dense"} and set(ev.modes()) - {"dense"}
        assert set(MODE_NAMES[int(m)] for m in ev.mode.unique()) == set(ev.modes())


@pytest.mark.skipif(len(BACKENDS) < 2, reason="optden._C without the patch passes")
@pytest.mark.parametrize("padding", ["circular", "zero"])
def test_cpu_and_torch_passes_agree(padding, rng):
    """The compiled passes and the torch ones on random images of an odd size, M > one tile."""
    raw = rng.integers(0, 256, (203, 2, 11, 6), dtype=np.uint8)
    ds = optden.Dataset.from_array(raw)
    x = ds.images(np.arange(5)).numpy() + 0.4 * rng.standard_normal((5, 2, 11, 6))
    for kind in ("local", "equivariant", "composite"):
        a = LocalDenoiser(ds, 5, kind=kind, padding=padding, backend="cpu")(torch.from_numpy(x), 0.4)
        b = LocalDenoiser(ds, 5, kind=kind, padding=padding, backend="torch")(torch.from_numpy(x), 0.4)
        assert rel_err(a, b.numpy()) <= 1e-12, kind


def test_float_rows_and_per_query_sigma(rng):
    raw = rng.standard_normal((60, 3, 6, 5)).astype(np.float32)
    ds = optden.Dataset.from_array(raw, scale=1.0, offset=0.0)
    y = ds.images(np.arange(ds.M)).numpy()
    sig = np.array([1e-2, 0.5, 50.0])
    x = y[:3] + sig[:, None, None, None] * rng.standard_normal((3, 3, 6, 5))
    for kind in ("local", "composite"):
        ev = LocalDenoiser(ds, 3, kind=kind).denoise_certified(torch.from_numpy(x), torch.from_numpy(sig))
        ref = np.concatenate([ORACLES[kind](x[j : j + 1], y, sig[j], 3, "circular") for j in range(3)])
        check(ev, ref, kind)


def test_patch_size_schedules(digits_ds, rng):
    ds = digits_ds
    y = ds.images(np.arange(ds.M)).numpy()
    x = queries(ds, 0.5, rng)
    grid = optden.get_schedule("edm", 4)
    sizes = [7, 5, 3, 1]  # one per positive sigma of the grid
    den = LocalDenoiser(ds, sizes, padding="zero", sigmas=grid)
    for s, k in zip(grid.sigmas[:-1].tolist(), sizes):
        ev = den.denoise_certified(torch.from_numpy(x), s * 1.01)  # nearest grid sigma in log scale
        assert (ev.patch_size == k).all()
        check(ev, R.local_denoise(x, y, s * 1.01, k, "zero"))
    fn = LocalDenoiser(ds, lambda s: 3 if s < 1 else 5, kind="composite")
    sig = torch.tensor([0.5, 2.0, 0.5])
    ev = fn.denoise_certified(torch.from_numpy(x), sig)
    assert ev.patch_size.tolist() == [3, 5, 3]
    ref = np.concatenate([R.composite_denoise(x[j : j + 1], y, float(sig[j]), [3, 5, 3][j]) for j in range(3)])
    check(ev, ref)


def test_a_sampler_drives_the_size_list(digits_ds):
    """A list of sizes aligned with the sampler's grid: every denoiser call of Heun's
    sampler (its second stages included) is at a grid sigma and uses that sigma's size."""
    grid = optden.get_schedule("edm", 4)
    sizes = [7, 5, 3, 3]
    den = LocalDenoiser(digits_ds.subset(np.arange(40)), sizes, padding="zero", sigmas=grid)
    calls, evaluate = [], den.evaluate

    def spy(u, sigma, labels=None, **kw):
        ev = evaluate(u, sigma, labels, **kw)
        calls.append((sigma.tolist(), ev.patch_size.tolist()))
        return ev

    den.evaluate = spy
    run = optden.sample(den, n=2, schedule=grid, seed=0)
    assert torch.isfinite(run.samples).all()
    by_sigma = dict(zip(grid.sigmas[:-1].tolist(), sizes))
    seen = set()
    for sig, ks in calls:
        for s, k in zip(sig, ks):
            assert any(abs(s - g) <= 1e-12 * g for g in by_sigma), s
            g = min(by_sigma, key=lambda t: abs(t - s))
            assert k == by_sigma[g]
            seen.add(g)
    assert seen == set(by_sigma)  # Heun evaluates at every positive grid sigma


@pytest.mark.parametrize("kind", ["local", "equivariant", "composite"])
def test_sampling_and_analyses_take_it(kind, digits_ds):
    den = LocalDenoiser(digits_ds.subset(np.arange(40)), 3, kind=kind)
    run = optden.sample(den, n=3, steps=4, seed=1, record=True)
    assert run.samples.shape == (3, 1, 8, 8) and torch.isfinite(run.samples).all()
    mem = optden.memorization(run.samples, den)
    assert mem.nn1_index.shape == (3,)
    jump = optden.ode_jump(den, run.trajectory[1], float(run.sigmas[1]))
    assert torch.isfinite(jump).all()
    score = den.score(run.trajectory[1], float(run.sigmas[1]))
    assert score.shape == (3, 1, 8, 8)


def test_infinite_sigma(digits_ds, rng):
    """sigma = inf (a flow-matching grid's first point): uniform weights, the oracle's limit
    (sigma 1e12), for every kind and padding; a flow-schedule run samples."""
    ds = digits_ds.subset(np.arange(30))
    y = ds.images(np.arange(ds.M)).numpy()
    x = rng.standard_normal((2, 1, 8, 8))
    for kind in ("local", "equivariant", "composite"):
        for padding in ("circular", "zero"):
            out = LocalDenoiser(ds, 3, kind=kind, padding=padding)(torch.from_numpy(x), float("inf"))
            assert rel_err(out, ORACLES[kind](x, y, 1e12, 3, padding)) <= 1e-12, (kind, padding)
    run = optden.sample(LocalDenoiser(ds, 3), n=2, steps=3, schedule="flow")
    assert torch.isfinite(run.samples).all()


def test_what_only_dstar_has_is_refused(digits_ds):
    """D*'s diagnostics, covariance and derivatives are not a local denoiser's: refused, and
    sample(record=True) records none and samples the local denoiser itself."""
    den = LocalDenoiser(digits_ds.subset(np.arange(40)), 3)
    rec = optden.sample(den, n=2, steps=3, seed=4, record=True)
    plain = optden.sample(den, n=2, steps=3, seed=4)
    assert rec.diagnostics is None
    torch.testing.assert_close(rec.samples, plain.samples, rtol=0, atol=0)
    dstar = optden.sample(optden.OptimalDenoiser(den.dataset), n=2, steps=3, seed=4)
    assert (dstar.samples - plain.samples).abs().max() > 1e-3  # what recording D*'s pass would have given
    x = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(AttributeError, match="diagnostics"):
        den.diagnostics(x, 0.5)
    with pytest.raises(optden.InputError, match="posterior_cov"):
        den.posterior_cov(x, 0.5)
    with pytest.raises(optden.InputError, match="differentiable"):
        den(x.requires_grad_(True), 0.5)


class TestErrors:
    def test_bad_construction(self, digits_ds):
        with pytest.raises(optden.InputError, match="kind"):
            LocalDenoiser(digits_ds, 3, kind="global")
        with pytest.raises(optden.InputError, match="padding"):
            LocalDenoiser(digits_ds, 3, padding="reflect")
        with pytest.raises(optden.InputError, match="odd"):
            LocalDenoiser(digits_ds, 4)
        with pytest.raises(optden.DtypeError, match="patch_size"):
            LocalDenoiser(digits_ds, 3.0)
        with pytest.raises(optden.InputError, match="circular window wider"):
            LocalDenoiser(digits_ds, 9)
        with pytest.raises(optden.InputError, match="sigmas"):
            LocalDenoiser(digits_ds, [3, 5])
        with pytest.raises(optden.InputError, match="2 sizes"):
            LocalDenoiser(digits_ds, [3, 5], sigmas=[1.0, 0.5, 0.1])
        with pytest.raises(optden.InputError, match="backend"):
            LocalDenoiser(digits_ds, 3, backend="triton")
        flat = optden.Dataset.from_array(np.zeros((5, 7), dtype=np.uint8))
        with pytest.raises(optden.DatasetError, match="images"):
            LocalDenoiser(flat, 3)

    def test_bad_calls(self, digits_ds):
        den = LocalDenoiser(digits_ds, 3)
        x = torch.zeros(2, 1, 8, 8)
        with pytest.raises(optden.InputError, match="values"):
            den(torch.zeros(2, 1, 8, 7), 0.5)
        with pytest.raises(optden.InputError, match="sigma"):
            den(x, -1.0)
        with pytest.raises(optden.InputError, match="labels"):
            den(x, 0.5, class_labels=torch.tensor([0, 7]))
        with pytest.raises(optden.InputError, match="posterior"):
            den.posterior(x, 0.5)
        with pytest.raises(optden.InputError, match="density"):
            den.log_density(x, 0.5)
        bad = LocalDenoiser(digits_ds, lambda s: 4)
        with pytest.raises(optden.InputError, match="patch_size"):
            bad(x, 0.5)
