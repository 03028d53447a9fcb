"""The certified lower-bound embedding index (optden.prune.embedding, issue 22): its bounds
against exact distances, its certificate against the float64 oracle's true excluded mass,
the pruned denoiser, exact nearest rows, the neighbour cache across batch sizes,
persistence, and the C++ parts (re-score, box bounds, shell histograms, leaf scan)."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import optden
from optden import _ext
from optden import reference as R
from optden.engine.bounds import embedding_error, embedding_lower, mass_tolerance, orthonormality_slack
from optden.prune import EmbeddingIndex, exact_candidates, shell_log_mass
from optden.prune.embedding import far_bins, histogram_shells
from optden.prune.policy import EXPLORE_SHARE
from tolerances import DENOISE_RTOL, model_rows, rel_err

pytestmark = pytest.mark.skipif(_ext.C is None or not hasattr(_ext.C, "leaf_scan"),
                                reason="optden._C without the embedding kernels")


def centered(ds, u) -> torch.Tensor:
    return torch.from_numpy((np.asarray(u) - ds.offset) / ds.scale - np.asarray(ds.center))


def coef_of(ds, sigma, n) -> torch.Tensor:
    return torch.full((n,), ds.scale**2 / (2 * sigma**2), dtype=torch.float64)


@pytest.fixture(scope="module")
def faces(faces_u8):
    ds = optden.Dataset.from_array(faces_u8)
    return ds, EmbeddingIndex.build(ds, k=12, leaf_size=16, tree_dims=3, seed=1)


def exact_dist(ds, v: torch.Tensor) -> np.ndarray:
    """(n, M) exact distances from centered queries v to every centered row (float64 direct differences)."""
    q = model_rows(ds)
    q = (q - ds.offset) / ds.scale - np.asarray(ds.center)
    return np.sqrt(((v.numpy()[:, None, :] - q[None]) ** 2).sum(-1))


# ----------------------------------------------------------------------------- the bounds


@pytest.mark.parametrize("data", ["faces", "random"])
def test_embedding_distance_is_a_lower_bound(data, faces_u8, rng):
    """||e32(u) - e32(y)|| minus both embedding errors, / sqrt(1 + eta), never exceeds ||u - y||,
    also for a basis that is not orthonormal (eta then carries the slack)."""
    x = faces_u8 if data == "faces" else rng.integers(0, 256, (300, 37), dtype=np.uint8)
    ds = optden.Dataset.from_array(x)
    idx = EmbeddingIndex.build(ds, k=5, leaf_size=8)
    skewed = idx.basis * (1 + 1e-4 * rng.standard_normal(idx.basis.shape))  # not orthonormal
    for basis in (idx.basis, skewed):
        probe = EmbeddingIndex(ds, basis, idx.r0, idx.emb, idx.ids, idx.starts, idx.lo, idx.hi, idx.err_rows,
                               idx.fingerprint, idx.tree_cols)
        q = model_rows(ds)[:40]
        w = centered(ds, np.concatenate([q[:20], q[20:] + rng.standard_normal((20, ds.d)) * 0.3])).numpy()
        e64, e32, err = probe.embed(w)
        assert (err > 0).all() and probe.eta >= orthonormality_slack(basis) > 0
        pairs = rng.integers(0, len(w), (400, 2))
        a, b = pairs[:, 0], pairs[:, 1]
        emb = np.linalg.norm(e32[a].astype(np.float64) - e32[b].astype(np.float64), axis=1)
        low = embedding_lower(emb, err[a], float(err[b].max()), probe.eta)
        true = np.linalg.norm(w[a] - w[b], axis=1)
        assert (low <= true).all()
        assert (low[true > 1] > 0.3 * true[true > 1]).mean() > 0.5  # and not vacuous
        # the float32 rounding bound: e32 is within err of the float64 embedding
        assert (np.linalg.norm(e32 - e64, axis=1) <= err).all()


def test_embedding_error_covers_float32_rounding(rng):
    e64 = rng.standard_normal((50, 9)) * 1e3
    e32 = e64.astype(np.float32)
    err = embedding_error(e64, e32, np.full(50, 2e3), 10.0, 1e-14)
    assert (np.linalg.norm(e32.astype(np.float64) - e64, axis=1) < err).all()


def test_leaf_bounds_hold_for_every_member(faces, rng):
    ds, idx = faces
    y = model_rows(ds)
    v = centered(ds, np.concatenate([y[rng.integers(0, ds.M, 6)] + 0.05 * rng.standard_normal((6, ds.d)),
                                     rng.uniform(-1, 1, (3, ds.d))]))
    _, e32, err = idx.embed(v.numpy())
    low, near = idx.leaf_lower(e32, err, nearest=5)
    ex = exact_dist(ds, v)
    leaf_of = np.empty(ds.M, dtype=np.int64)
    leaf_of[idx.ids] = np.repeat(np.arange(idx.nlist), np.diff(idx.starts))
    assert (ex >= low[:, leaf_of]).all()
    assert (low > 0).mean() > 0.5  # the bounds exclude most leaves
    assert (np.sort(low, 1)[:, :5] == np.take_along_axis(low, near, 1)).all()  # the nearest leaves, ascending
    # the C++ conversion is bounds.embedding_lower of the box distance
    t = e32[:, idx.tree_cols].astype(np.float64)
    box = np.sqrt((np.maximum(0, np.maximum(idx.lo[None] - t[:, None], t[:, None] - idx.hi[None])) ** 2).sum(-1))
    assert np.allclose(low, embedding_lower(box, err[:, None], idx.err_rows, idx.eta), rtol=1e-12, atol=1e-9)


def test_scan_radius_and_scan(faces, rng):
    """Rows the scan does not return lie at least rho away; every returned distance is right."""
    ds, idx = faces
    y = model_rows(ds)
    v = centered(ds, y[rng.integers(0, ds.M, 5)] + 0.03 * rng.standard_normal((5, ds.d)))
    _, e32, err = idx.embed(v.numpy())
    rho = rng.uniform(5, 200, 5)
    R2 = idx.scan_radius(rho, err)
    assert (idx.scan_lower(R2.astype(np.float64), err) >= rho).all()
    ref2 = rng.uniform(0, 100, 5) ** 2
    cf = np.full(5, 0.05)
    lims, D, I, b, cnt, low = idx._scan(e32, np.tile(np.arange(idx.nlist), (5, 1)), R2, (err, ref2, cf))
    ex = exact_dist(ds, v)
    pos = np.empty(ds.M, dtype=np.int64)
    pos[idx.ids] = np.arange(ds.M)
    for j in range(5):
        Dj, Ij, bj = D[lims[j]:lims[j + 1]], I[lims[j]:lims[j + 1]], b[lims[j]:lims[j + 1]]
        out = np.setdiff1d(np.arange(ds.M), Ij)
        assert (ex[j, out] >= rho[j]).all()  # not returned: at least rho away
        ref = ((e32[j].astype(np.float64) - idx.stored_rows(pos[Ij]).astype(np.float64)) ** 2).sum(1)
        assert np.allclose(Dj, ref, rtol=1e-5, atol=1e-3) and (Dj < R2[j]).all()
        # each returned row's histogram bin is a valid shell for it, and the bins are the
        # ones histogram_shells gives its lower bound
        assert (low[j, bj] <= ex[j, Ij]).all() and cnt[j].sum() == len(Ij)
        lb = idx.scan_lower(Dj.astype(np.float64), np.full(len(Dj), err[j]))
        assert np.allclose(low[j, bj], np.minimum(low[j, bj], lb)) and (low[j, bj] <= lb * (1 + 1e-12)).all()


# ----------------------------------------------------------------------------- the certificate


@pytest.mark.parametrize("data", ["digits_u8", "faces_u8", "random"])
def test_certificate_never_below_true_excluded_mass(data, request, rng):
    """The certified bound against the float64 oracle's true excluded mass, sigma 1e-3..1e3,
    real patches and random rows (odd d = 29, with runs of duplicate rows)."""
    if data == "random":
        x = rng.integers(0, 256, (700, 29), dtype=np.uint8)
        x[100:120] = x[100]  # duplicates: the same distance, split weight
        x[300:303] = x[7]
    else:
        x = request.getfixturevalue(data)
    ds = optden.Dataset.from_array(x)
    idx = EmbeddingIndex.build(ds, k=8, leaf_size=12)
    src = optden.OptimalDenoiser(ds, prune="off").source(None)
    y = model_rows(ds)
    tol_mass = mass_tolerance(1e-6)
    for sigma in (1e-3, 1e-2, 0.05, 0.3, 3.0, 1e3):
        u = np.concatenate([y[rng.integers(0, ds.M, 6)] + sigma * rng.standard_normal((6, ds.d)),
                            0.5 * (y[:2] + y[2:4]), y[[100]] + sigma * rng.standard_normal((1, ds.d))])
        v, coef = centered(ds, u), coef_of(ds, sigma, len(u))

        def rescore(sel, i):
            return exact_candidates(v[sel], coef[sel], src, i, 1)[4]

        found = idx.certified_candidates(v, coef, tol_mass, rescore, max_scan=ds.M, max_rescore=ds.M)
        lse, *_ = exact_candidates(v, coef, src, found.idx, 1)
        bound = torch.exp(shell_log_mass(coef, found.counts, found.lower) - lse).numpy()
        w = R.weights(u, y, sigma)
        for j in np.flatnonzero(found.searched.numpy()):
            inside = np.zeros(ds.M, bool)
            inside[found.idx[j][found.idx[j] >= 0].numpy()] = True
            excluded = w[j, ~inside].sum() / w[j, inside].sum()
            assert bound[j] >= excluded * (1 - 1e-9), (sigma, j)
            assert found.counts[j].sum().item() >= (~inside).sum()  # every excluded row is in a shell
        if sigma <= 1e-2:  # concentrated posteriors: certified
            assert (bound[found.searched.numpy()] <= tol_mass).mean() >= 0.7


def test_histogram_and_far_bins(rng):
    n, X = 3, 500
    low = rng.uniform(0, 30, (n, X))
    low[0, :10] = np.inf
    count = rng.integers(0, 5, X).astype(np.float64)
    ref2 = np.array([4.0, 25.0, 100.0])
    coef = np.array([0.5, 0.1, 0.02])
    b, c, lo = histogram_shells(low, count, ref2, coef)
    assert (b[0, :10] == 255).all()
    for q in range(n):
        for x in range(X):
            if count[x] > 0 and np.isfinite(low[q, x]):
                assert lo[q, b[q, x]] <= low[q, x]
        live = (count > 0) & np.isfinite(low[q])
        assert c[q].sum() == count[live].sum()
    budget = 1e-3
    star = far_bins(c, lo, ref2, coef, budget)
    for q in range(n):
        out = np.arange(c.shape[1]) >= star[q]
        mass = (c[q, out] * np.exp(-coef[q] * (lo[q, out] ** 2 - ref2[q]))).sum()
        assert mass <= budget
        if star[q] > 0:  # one more bin would not fit
            o2 = np.arange(c.shape[1]) >= star[q] - 1
            assert (c[q, o2] * np.exp(-coef[q] * (lo[q, o2] ** 2 - ref2[q]))).sum() > budget * (1 - 1e-9)


# ----------------------------------------------------------------------------- end to end


def test_posterior_matches_oracle(faces, rng):
    """Top weights from the pruned path (the oracle test of D* and log p over the contract's
    sigmas is tests/test_prune.py's, for every index kind)."""
    ds, idx = faces
    y = model_rows(ds)
    den = optden.OptimalDenoiser(ds, prune=idx)
    textured = np.flatnonzero(y.std(axis=1) > 0.15)
    for sigma in (1e-3, 0.02, 0.1, 3.0):
        u = y[rng.choice(textured, 5)] + sigma * rng.standard_normal((5, ds.d))
        w, ii = den.posterior(torch.from_numpy(u), sigma, k=3)
        wr = R.weights(u, y, sigma)
        assert np.allclose(w.numpy(), np.sort(wr, 1)[:, ::-1][:, :3], rtol=1e-6, atol=1e-12)
        assert np.allclose(wr[np.arange(5)[:, None], ii.numpy()], w.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_float_rows(dtype, rng):
    x = rng.standard_normal((400, 23)).astype(np.float32)
    x[100:110] = x[100]  # duplicates split weight
    ds = optden.Dataset.from_array(x, dtype=dtype)
    idx = EmbeddingIndex.build(ds, k=6, leaf_size=10)
    den = optden.OptimalDenoiser(ds, prune=idx)
    y = model_rows(ds)
    for sigma in (1e-3, 0.05, 3.0):
        u = y[[0, 100, 7]] + sigma * rng.standard_normal((3, ds.d))
        assert rel_err(den(torch.from_numpy(u), sigma), R.denoise(u, y, sigma)) <= DENOISE_RTOL


def test_nearest_and_memorization_exact(digits_u8, rng):
    ds = optden.Dataset.from_array(digits_u8)
    idx = EmbeddingIndex.build(ds, k=10, leaf_size=16)
    den = optden.OptimalDenoiser(ds, prune=idx)
    dense = optden.OptimalDenoiser(ds, prune="off")
    y = model_rows(ds)
    u = np.concatenate([y[:5], y[5:10] + 0.02 * rng.standard_normal((5, ds.d)), 0.5 * (y[10:13] + y[13:16]),
                        rng.uniform(-1, 1, (2, ds.d))])
    d, i = den.nearest(torch.from_numpy(u), k=2)
    ex = np.sqrt(((u[:, None, :] - y[None]) ** 2).sum(-1))
    assert np.allclose(d.numpy(), np.sort(ex, 1)[:, :2], rtol=1e-12, atol=1e-12)
    assert np.allclose(ex[np.arange(len(u))[:, None], i.numpy()], d.numpy(), rtol=1e-12, atol=1e-12)
    m1 = optden.memorization(torch.from_numpy(u), den)
    m2 = optden.memorization(torch.from_numpy(u), dense)
    assert torch.equal(m1.memorized, m2.memorized)
    assert torch.allclose(m1.nn1_distance, m2.nn1_distance, rtol=1e-12, atol=1e-12)


def test_cache_across_batch_sizes(faces, rng):
    """Mean shift drops converged points: the cache follows the shrinking batch and every
    cached answer is still certified."""
    ds, idx = faces
    y = model_rows(ds)
    den = optden.OptimalDenoiser(ds, prune=idx)
    textured = np.flatnonzero(y.std(axis=1) > 0.15)
    x0 = torch.from_numpy(y[rng.choice(textured, 8)] + 0.01 * rng.standard_normal((8, ds.d)))
    res = optden.mean_shift(den, x0, 0.02, max_iter=30, tol=1e-9)
    ref = optden.mean_shift(optden.OptimalDenoiser(ds, prune="off"), x0, 0.02, max_iter=30, tol=1e-9)
    assert rel_err(res.modes, ref.modes) <= DENOISE_RTOL
    assert torch.equal(res.nearest_index, ref.nearest_index)
    pr = den.pruner()
    u = x0[:5]
    den(x0, 0.02)
    hits = pr.cache.hits
    ev = den.denoise_certified(u + 1e-7, 0.02)  # a smaller batch, matched to cached rows
    assert ev.mode.count("cached") >= 3 and pr.cache.hits > hits
    assert rel_err(ev.denoised, R.denoise((u + 1e-7).numpy(), y, 0.02)) <= DENOISE_RTOL


def test_auto_chooses_dense_where_pruning_cannot_pay(faces, rng):
    """prune="auto": at a sigma far above the rows' nearest-neighbour scale no query can be
    certified, so every group runs dense without a search; at small sigma it prunes; a
    sigma with nothing measured nearby and a prior share >= EXPLORE_SHARE is tried pruned
    once; and what it measured (nothing certified, or searches slower than the pass) sends
    later groups dense. Both answers match the oracle."""
    ds, idx = faces
    y = model_rows(ds)
    den = optden.OptimalDenoiser(ds, prune=idx, prune_policy="auto")
    textured = np.flatnonzero(y.std(axis=1) > 0.15)
    u = y[rng.choice(textured, 6)]
    broad = u + 3.0 * rng.standard_normal(u.shape)
    ev = den.denoise_certified(torch.from_numpy(broad), 3.0)
    pol = den._policy
    assert pol.prior_share(3.0 / ds.scale) == 0.0
    assert pol.decisions == {"pruned": 0, "dense": 1} and "pruned" not in ev.mode
    assert den.pruner().last["searched"] == 0  # no search was spent
    # the whole evaluation was recorded, as dense, at its sigma
    assert pol.measured_cost(3.0 / ds.scale, False) > 0 and pol.measured_cost(3.0 / ds.scale, True) is None
    assert rel_err(ev.denoised, R.denoise(broad, y, 3.0)) <= DENOISE_RTOL
    sharp = u + 1e-3 * rng.standard_normal(u.shape)
    ev = den.denoise_certified(torch.from_numpy(sharp), 1e-3)
    assert pol.decisions["pruned"] == 1 and ev.mode.count("pruned") >= 5
    assert pol.measured_cost(1e-3 / ds.scale, True) > 0 and pol.measured_cost(1e-3 / ds.scale, False) is None
    assert rel_err(ev.denoised, R.denoise(sharp, y, 1e-3)) <= DENOISE_RTOL
    # measured outcomes override the prior: nothing certified near a sigma -> dense there
    pol.evaluations.clear()  # (the model's branch: no whole evaluation measured)
    s_raw = 0.05 / ds.scale
    pol.record_dense(64, 1.0)
    pol.record_dense(8, 0.5)
    # nothing measured near a sigma whose prior share is at least EXPLORE_SHARE: tried pruned
    share = np.array([pol.prior_share(s / ds.scale) for s in np.geomspace(1e-3, 3.0, 40)])
    s_try = np.geomspace(1e-3, 3.0, 40)[np.flatnonzero(share >= EXPLORE_SHARE)[-1]] / ds.scale
    pol.outcomes.clear()
    assert pol.choose(s_try, 64)
    pol.record_pruned(s_try, 64, 0, 0.01)  # ... and once measured, the outcome decides
    assert not pol.choose(s_try, 64)
    pol.record_pruned(s_raw, 64, 0, 0.01)
    assert not pol.choose(s_raw, 64)
    # all certified but each search as slow as a quarter of the pass: dense again
    pol.record_pruned(2e-3 / ds.scale, 64, 64, 64 * 0.25)
    assert not pol.choose(2e-3 / ds.scale, 64)
    # all certified and cheap: pruned
    pol.record_pruned(2e-4 / ds.scale, 64, 64, 64 * 1e-5)
    assert pol.choose(2e-4 / ds.scale, 64)
    pruned, dense = pol.estimate(2e-4 / ds.scale, 64)
    assert pruned == pytest.approx(64 * 1e-5) and dense == pytest.approx(sum(pol.dense_model() * np.array([1, 64])))


def test_auto_measured_evaluations_override_the_model():
    """What whole evaluations cost decides over the model: a pruned way that loses to dense
    near a sigma is run at most once there (then dense is measured, and wins); one measured
    far below the cheapest dense evaluation keeps pruning without measuring dense."""
    from optden.prune.policy import CONFIDENT, MARGIN, PrunePolicy

    class Index:  # what the policy reads of an index
        M, d = 1_000_000, 192

    pol = PrunePolicy(Index(), 1e-7)
    pol._nn = np.full(256, 1e9)  # every query looks certifiable a priori: the model explores
    costs = {True: 0.37, False: 0.35}  # seconds for 64 queries: pruning loses by 6%
    ways = []
    for _ in range(12):
        go = pol.choose(0.05, 64)
        ways.append(go)
        if go:
            pol.record_pruned(0.05, 64, 38, 0.15)
            pol.record_dense(26, 0.22)
        else:
            pol.record_dense(64, costs[False])
        pol.record_evaluation(0.05, 64, costs[go], go)
    assert ways[0] and not any(ways[1:])  # explored once, then dense (measured) every time
    # near a sigma where a pruned evaluation cost under CONFIDENT of the cheapest dense one
    # seen anywhere: pruned, without a dense measurement there
    far = 0.05e-3  # 3 decades down: no bin near 0.05's
    pol.record_evaluation(far, 64, 0.9 * CONFIDENT * costs[False], True)
    assert pol.measured_cost(far, False) is None and pol.choose(far, 64)
    pol.record_evaluation(far, 64, 2 * costs[False], True)  # its mean now above: dense, to measure it
    assert not pol.choose(far, 64)
    # both measured: pruned only when below (1 - MARGIN) of dense
    pol.record_evaluation(far, 64, 10.0, False)
    assert pol.choose(far, 64)
    pol.record_evaluation(far, 64, 0.0 + 1e-9, False)
    mean_d = pol.measured_cost(far, False)
    assert pol.choose(far, 64) == (pol.measured_cost(far, True) < (1 - MARGIN) * mean_d)


def test_save_load_and_rejection(tmp_path, digits_u8):
    ds = optden.Dataset.from_array(digits_u8)
    ds.save(tmp_path / "ds")
    ds = optden.Dataset.load(tmp_path / "ds")
    idx = EmbeddingIndex.build(ds, k=6, leaf_size=20)
    idx.save()
    assert EmbeddingIndex.exists(ds)
    back = EmbeddingIndex.load(ds)
    for name in ("basis", "emb", "ids", "starts", "lo", "hi"):
        assert np.array_equal(getattr(back, name), getattr(idx, name))
    den = optden.OptimalDenoiser(ds)  # prune="auto" finds the saved index
    assert isinstance(den.pruner().index, EmbeddingIndex) and den.prune_policy == "auto"
    other = digits_u8.copy()
    other[0, 0] ^= 1
    ds2 = optden.Dataset.from_array(other)
    with pytest.raises(optden.DatasetError, match="other rows"):
        EmbeddingIndex.load(ds2, dir=tmp_path / "ds")
    npz, _ = EmbeddingIndex.paths(tmp_path / "ds")
    with open(npz, "r+b") as f:
        f.seek(200)
        f.write(b"\0\1\2")
    with pytest.raises(optden.DatasetError, match="corrupt"):
        EmbeddingIndex.load(ds)


def test_bad_arguments(digits_u8):
    ds = optden.Dataset.from_array(digits_u8)
    with pytest.raises(optden.InputError, match="k:"):
        EmbeddingIndex.build(ds, k=0)
    with pytest.raises(optden.InputError, match="leaf_size"):
        EmbeddingIndex.build(ds, leaf_size=1.5)
    with pytest.raises(optden.DtypeError, match="dataset"):
        EmbeddingIndex.build(digits_u8)
    with pytest.raises(optden.InputError, match="prune_policy"):
        optden.OptimalDenoiser(ds, prune="off", prune_policy="sometimes")
    with pytest.raises(optden.DatasetNotFoundError, match="embedding index"):
        EmbeddingIndex.load(ds, dir="/nonexistent")


# ----------------------------------------------------------------------------- the C++ re-score


@pytest.mark.parametrize("dtype", ["uint8", "float32", "float16", "bfloat16"])
def test_candidate_softmax_matches_torch(dtype, rng):
    x = (rng.integers(0, 256, (90, 13)) if dtype == "uint8" else rng.standard_normal((90, 13))).astype(
        np.uint8 if dtype == "uint8" else np.float32)
    ds = optden.Dataset.from_array(x, dtype=None if dtype == "uint8" else dtype)
    src = optden.OptimalDenoiser(ds, prune="off").source(None)
    v = centered(ds, model_rows(ds)[:4] + 0.1 * rng.standard_normal((4, 13)))
    coef = torch.tensor([0.01, 1.0, 30.0, 0.5], dtype=torch.float64)
    idx = torch.from_numpy(rng.integers(0, 90, (4, 7)))
    idx[1, 3:] = -1
    a = exact_candidates(v, coef, src, idx, 3)
    from optden.prune.pruner import _torch_candidates  # private: the reference path of the same function

    lse, dc, w, lg = _torch_candidates(v, coef, src, idx, 1 << 27)
    assert torch.allclose(a[0], lse, rtol=1e-13, atol=1e-12) and torch.allclose(a[4], lg, rtol=1e-13, atol=1e-12)
    # weights exp(l - lse) inherit the logits' rounding (~1e-16 |l|, |l| up to ~1e7 here)
    assert rel_err(a[1], dc) <= 1e-8
    with pytest.raises(ValueError, match="idx"):
        _ext.C.candidate_softmax(v.numpy(), coef.numpy(), ds.raw, np.full((4, 2), 90), np.asarray(src.center), dtype)


@pytest.mark.parametrize("dtype", ["uint8", "float32", "bfloat16"])
def test_candidate_sqdist_is_the_softmax_logits_at_coef_one(dtype, rng):
    x = (rng.integers(0, 256, (70, 11)) if dtype == "uint8" else rng.standard_normal((70, 11))).astype(
        np.uint8 if dtype == "uint8" else np.float32)
    ds = optden.Dataset.from_array(x, dtype=None if dtype == "uint8" else dtype)
    src = optden.OptimalDenoiser(ds, prune="off").source(None)
    v = centered(ds, model_rows(ds)[:5] + 0.3 * rng.standard_normal((5, 11)))
    idx = rng.integers(0, 70, (5, 9))
    idx[2, 4:] = -1
    args = (np.ascontiguousarray(v.numpy()), ds.raw, idx, np.asarray(src.center, dtype=np.float64), dtype)
    d2 = _ext.C.candidate_sqdist(*args)
    lg, _, _ = _ext.C.candidate_softmax(args[0], np.ones(5), *args[1:])
    assert np.array_equal(d2, -lg)  # the same arithmetic, bit for bit (inf where idx is -1)
    raw = np.asarray(ds.raw_rows(np.arange(70)).to(torch.float64)) - np.asarray(src.center)
    ok = idx >= 0
    want = ((v.numpy()[:, None, :] - raw[np.where(ok, idx, 0)]) ** 2).sum(-1)
    assert np.allclose(d2[ok], want[ok], rtol=1e-13) and np.isinf(d2[~ok]).all()
    with pytest.raises(ValueError, match="idx"):
        _ext.C.candidate_sqdist(args[0], ds.raw, np.full((5, 2), 70), args[3], dtype)


def test_certified_nearest_answers_pruned_with_duplicate_rows(digits_u8, rng):
    # copies of rows (ties at the k-th distance) and queries on rows: the pruned search
    # answers them (ok) with the exact distances, ties broken by row number
    x = np.concatenate([digits_u8, digits_u8[:40]])
    ds = optden.Dataset.from_array(x)
    idx = EmbeddingIndex.build(ds, k=12, leaf_size=16)
    den = optden.OptimalDenoiser(ds, prune=idx)
    y = model_rows(ds)
    u = np.concatenate([y[:20], y[50:70] + 0.01 * rng.standard_normal((20, ds.d))])
    src = den.source(None)
    v = centered(ds, u)
    from optden.prune.pruner import exact_sq_distances

    d2, ii, ok = idx.certified_nearest(v, 3, lambda sel, i: exact_sq_distances(v[sel], src, i), max_scan=ds.M)
    assert bool(ok.all())
    ex = ((v.numpy()[:, None, :] - (np.asarray(ds.raw_rows(np.arange(ds.M)).to(torch.float64)) - np.asarray(src.center))[None]) ** 2).sum(-1)
    assert np.allclose(d2.numpy(), np.sort(ex, 1)[:, :3], rtol=1e-12, atol=1e-12)
    assert np.allclose(np.take_along_axis(ex, ii.numpy(), 1), d2.numpy(), rtol=1e-12, atol=1e-12)
    # a query on a copied row: both copies at distance 0, the lower row number first
    assert ii[0, 0].item() == 0 and ii[0, 1].item() == digits_u8.shape[0]


def test_default_k_follows_the_dimension(digits_u8):
    from optden.prune.embedding import default_k

    assert [default_k(d) for d in (8, 64, 192, 768, 3072, 12288)] == [32, 32, 48, 128, 128, 128]
    ds = optden.Dataset.from_array(digits_u8[:200])
    assert EmbeddingIndex.build(ds).k == 32  # d = 64
    small = optden.Dataset.from_array(digits_u8[:200, :20])
    assert EmbeddingIndex.build(small).k == 20  # never more than d
    from optden.prune.embedding import default_leaf_size

    assert [default_leaf_size(k) for k in (20, 48, 64, 65, 128)] == [256, 256, 256, 64, 64]
    wide = optden.Dataset.from_array(np.tile(digits_u8[:300], (1, 5))[:, :300])  # d = 300: k = 75
    idx = EmbeddingIndex.build(wide)
    assert idx.k == 75 and np.diff(idx.starts).max() <= 64 < np.diff(EmbeddingIndex.build(wide, k=64).starts).max()


@pytest.mark.parametrize("dim", [3, 8, 13, 49])
def test_leaf_blocks_round_trip_and_scan_agree(dim, rng):
    # the split layout holds every row, and the scan reads it as whole rows (same sums up to
    # float32 rounding); the last leaf spans several of the scan's 64-row lane groups
    from optden.prune.embedding import _leaf_blocks

    E = rng.standard_normal((200, dim)).astype(np.float32)
    starts = np.array([0, 7, 8, 30, 200])
    ix = EmbeddingIndex.__new__(EmbeddingIndex)
    ix.emb, ix.starts, ix.dim = _leaf_blocks(E, starts), starts, dim
    assert np.array_equal(ix.stored_rows(np.arange(200)), E)
    assert np.array_equal(ix.stored_rows(np.array([199, 0, 64, 7])), E[[199, 0, 64, 7]])
    q = rng.standard_normal((2, dim)).astype(np.float32)
    lists = np.tile(np.arange(4), (2, 1))
    z2 = np.zeros(2)
    lims, D, I, *_ = _ext.C.leaf_scan(q, lists, np.full(2, np.inf, dtype=np.float32), ix.emb, starts, np.arange(200),
                                      z2, 1.0, 1.0, 1.0, z2, np.ones(2), 0.5, 0)
    for j in range(2):
        want = ((q[j].astype(np.float64) - E.astype(np.float64)) ** 2).sum(1)
        assert np.array_equal(I[lims[j]:lims[j + 1]], np.arange(200))
        assert np.allclose(D[lims[j]:lims[j + 1]], want, rtol=1e-5)
    # a finite radius returns exactly the rows within it (none near the edge, by the data)
    R = np.float32(np.median(want))
    lims, D, I, *_ = _ext.C.leaf_scan(q[1:], lists[1:], np.array([R]), ix.emb, starts, np.arange(200), z2[:1], 1.0,
                                      1.0, 1.0, z2[:1], np.ones(1), 0.5, 0)
    near_edge = np.abs(want - R) <= 1e-4 * R
    assert np.array_equal(np.sort(I)[~near_edge[np.sort(I)]], np.flatnonzero((want < R) & ~near_edge))


def _layout_v2(E, starts, lead=8):
    """Rows E (M, dim) in the version-2 layout: per leaf, the leading block row after row."""
    M, dim = E.shape
    lead = min(lead, dim)
    flat = np.empty(M * dim, dtype=np.float32)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        flat[a * dim: a * dim + (b - a) * lead] = E[a:b, :lead].reshape(-1)
        flat[a * dim + (b - a) * lead: b * dim] = E[a:b, lead:].reshape(-1)
    return flat.reshape(M, dim)


@pytest.mark.parametrize("version", [1, 2])
def test_older_index_files_still_load(tmp_path, digits_u8, rng, version):
    # indexes saved in an older layout (1: whole rows leaf after leaf; 2: the leading block
    # row after row) convert on load to the layout the scan reads
    import json

    from optden.fileio import sha256_file

    ds = optden.Dataset.from_array(digits_u8[:300])
    idx = EmbeddingIndex.build(ds, k=10, leaf_size=16)
    idx.save(tmp_path)
    npath, jpath = EmbeddingIndex.paths(tmp_path)
    rows = idx.stored_rows(np.arange(ds.M))
    with np.load(npath) as z:
        a = {name: z[name] for name in z.files}
    a["emb"] = rows if version == 1 else _layout_v2(rows, idx.starts)
    assert not np.array_equal(a["emb"], idx.emb)
    with open(npath, "wb") as f:
        np.savez(f, **a)
    meta = json.loads(jpath.read_text())
    meta.update(version=version, arrays_sha256=sha256_file(npath))
    jpath.write_text(json.dumps(meta))
    old = EmbeddingIndex.load(ds, dir=tmp_path)
    assert np.array_equal(old.emb, idx.emb) and np.array_equal(old.stored_rows(np.arange(ds.M)), rows)


def test_leaf_scan_grouped_agrees_with_the_scan_query_after_query(rng):
    # the leaf-major scan returns, per query, the rows of leaf_scan (same sums), by row
    # number; queries with no leaves return nothing; bad lists are refused by name
    from optden.prune.embedding import _leaf_blocks

    dim, M = 13, 300
    E = rng.standard_normal((M, dim)).astype(np.float32)
    starts = np.array([0, 40, 41, 100, 180, 300])
    emb, ids = _leaf_blocks(E, starts), rng.permutation(M)
    q = rng.standard_normal((6, dim)).astype(np.float32)
    r2 = np.array([10, 20, 30, 40, 0, np.inf], dtype=np.float32)
    lists = [[0, 2, 4], [], [1, 3], [4, 3, 2, 1, 0], [0], [2, 4]]
    qlims = np.cumsum([0] + [len(x) for x in lists])
    lims, D, I = _ext.C.leaf_scan_grouped(q, qlims, np.array(sum(lists, []), dtype=np.int64), r2, emb, starts, ids)
    z = np.zeros(1)
    for j, ls in enumerate(lists):
        got_I, got_D = I[lims[j]:lims[j + 1]], D[lims[j]:lims[j + 1]]
        assert np.array_equal(got_I, np.sort(got_I))
        if not ls:
            assert got_I.size == 0
            continue
        l2, D2, I2, *_ = _ext.C.leaf_scan(q[j:j + 1], np.array([ls]), r2[j:j + 1], emb, starts, ids, z, 1.0, 1.0, 1.0,
                                          z, np.ones(1), 0.5, 0)
        order = np.argsort(I2)
        assert np.array_equal(got_I, I2[order]) and np.array_equal(got_D, D2[order])
    assert lims[5] - lims[4] == 0 and lims[6] - lims[5] == 59 + 120  # r2 0: none; inf: all of leaves 2, 4
    with pytest.raises(ValueError, match="qleaves"):
        _ext.C.leaf_scan_grouped(q[:1], np.array([0, 1]), np.array([5]), r2[:1], emb, starts, ids)
    with pytest.raises(ValueError, match="qlims"):
        _ext.C.leaf_scan_grouped(q[:1], np.array([0, 2]), np.array([1]), r2[:1], emb, starts, ids)


def test_certified_nearest_over_many_chunks_and_the_scan_limit(digits_u8, rng, monkeypatch):
    # more queries than one chunk (the bounds run per chunk, the scan once per block of
    # GROUPED_QUERIES), and a scan limit that some queries exceed: those say ok False, the
    # others are exact; blocks of 37 queries, or scans of ~300 rows, give the same answers
    from optden.prune import embedding
    from optden.prune.embedding import QUERY_CHUNK
    from optden.prune.pruner import exact_sq_distances

    ds = optden.Dataset.from_array(digits_u8)
    idx = EmbeddingIndex.build(ds, k=10, leaf_size=16)
    den = optden.OptimalDenoiser(ds, prune=idx)
    y = model_rows(ds)
    n = 2 * QUERY_CHUNK + 21
    u = np.concatenate([y[:n - 30] + 0.02 * rng.standard_normal((n - 30, ds.d)), rng.uniform(-1, 1, (30, ds.d))])
    src = den.source(None)
    v = centered(ds, u)
    ex = ((v.numpy()[:, None, :] - (np.asarray(ds.raw_rows(np.arange(ds.M)).to(torch.float64))
                                    - np.asarray(src.center))[None]) ** 2).sum(-1)
    for max_scan, all_ok in ((ds.M, True), (0.3 * ds.M, False)):
        d2, ii, ok = idx.certified_nearest(v, 2, lambda sel, i: exact_sq_distances(v[sel], src, i), max_scan=max_scan)
        ok = ok.numpy()
        assert bool(ok.all()) == all_ok and ok[:n - 30].mean() > 0.5
        assert np.allclose(d2.numpy()[ok], np.sort(ex, 1)[ok, :2], rtol=1e-12, atol=1e-12)
        assert np.allclose(np.take_along_axis(ex, ii.numpy(), 1)[ok], d2.numpy()[ok], rtol=1e-12, atol=1e-12)
        assert (ii.numpy()[~ok] == -1).all()
        for name, value in (("GROUPED_QUERIES", 37), ("SCAN_ROWS_PER_CALL", 300)):
            with monkeypatch.context() as m:
                m.setattr(embedding, name, value)
                again = idx.certified_nearest(v, 2, lambda sel, i: exact_sq_distances(v[sel], src, i),
                                              max_scan=max_scan)
            assert torch.equal(again[2], torch.from_numpy(ok)) and torch.equal(again[1], ii)
