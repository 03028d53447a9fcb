"""Certified pruning at a million rows (issue 22): what the pruned path certifies against
what the posterior allows, and its time against the dense cpu pass, in one process.

Data: ``optden.data.large_patches_dataset`` (every distinct textured 8x8 RGB patch at
stride 1 of the bundled pictures, 2.95M rows of d = 192; ``--size 16``: d = 768), of
which ``--rows`` are drawn (seeded; 0: all). Queries: ``--queries`` rows y_i drawn at
random, u = y_i + sigma n (model units, n standard normal), at each ``--sigmas``.

Per sigma:

* achievable: the share of queries whose true weight outside their top 64 rows (float64,
  every row: the oracle's softmax computed in row chunks) is below tol / 10 (the mass
  the certificate may leave out; tol the denoiser's);
* certified: the share the pruned path answers "pruned" (certified, no dense fallback),
  for the embedding index and, with ``--ivf``, the FAISS IVF index of ``optden.prune.index``;
* left / ceiling: the dense pass for the queries the embedding did not certify, alone,
  and dense / that: the most any pruned path that leaves them to the dense pass can gain;
* time: median seconds of one evaluation of all the queries, dense cpu pass vs pruned
  (embedding, forced: prune_policy="always"), prune="auto"'s choice, and IVF, called in
  rounds in this process (the neighbour cache is cleared before every pruned call, so
  each pays its search); ratio = dense / pruned (> 1: pruning pays); dpe = dense-pass
  equivalents = pruned / dense;
* the largest relative difference of the pruned answers from the dense ones;
* with ``--workloads``: mean shift at ``--bandwidth`` to convergence, an EDM Heun run
  (35 evaluations) of ``--sample`` samples and memorization (certified NN1 / NN2) of
  ``--memorize`` samples, dense vs prune="auto".

    .venv/bin/python bench/bench_prune.py                     # 1.2M rows, d = 192
    .venv/bin/python bench/bench_prune.py --rows 300000 --ivf # smaller, with IVF
    .venv/bin/python bench/bench_prune.py --sigmas 0.05 --workloads  # + mean shift, memorization
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time

# Two OpenMP runtimes share the 2 cores here (torch's and optden._C's): threads that spin
# after one's parallel region steal the other's. Passive waiting, before either loads.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import commit, interleaved_runs, interleaved_times, machine, rel_err  # noqa: E402

import optden  # noqa: E402
from optden.data import large_patches_dataset  # noqa: E402
from optden.engine.bounds import mass_tolerance  # noqa: E402
from optden.prune import EmbeddingIndex, PruneIndex  # noqa: E402

TOP = 64  # the issue's measure: true weight outside the top 64 rows


def subset(full, rows: int, seed: int):
    """A Dataset of ``rows`` rows of ``full`` drawn without replacement (all when 0 or more than it has)."""
    if rows <= 0 or rows >= full.M:
        return full
    sel = np.sort(np.random.default_rng(seed).choice(full.M, rows, replace=False))
    raw = np.asarray(full.raw_rows(sel))
    return optden.Dataset.from_array(raw, image_shape=full.image_shape)


def true_tails(ds, u: torch.Tensor, sigma: float, top: int, chunk: int = 100_000) -> np.ndarray:
    """(n,) the exact weight outside each query's top ``top`` rows, float64 over every row
    (model space; logits -||u - y||^2 / 2 sigma^2 by direct differences, chunked)."""
    n = u.shape[0]
    best = torch.full((n, top), -torch.inf, dtype=torch.float64)
    lse = torch.full((n,), -torch.inf, dtype=torch.float64)
    for a in range(0, ds.M, chunk):
        y = ds.raw_block(a, min(ds.M, a + chunk)).to(torch.float64) * ds.scale + ds.offset
        d2 = (u * u).sum(1)[:, None] - 2 * u @ y.T + (y * y).sum(1)[None, :]
        # refine the expansion's cancellation on the candidates that matter: direct differences
        lg = -d2.clamp(min=0) / (2 * sigma * sigma)
        cand = torch.topk(lg, min(top, lg.shape[1]), dim=1).indices
        exact = -((u[:, None, :] - y[cand]) ** 2).sum(-1) / (2 * sigma * sigma)
        lg.scatter_(1, cand, exact)
        lse = torch.logaddexp(lse, torch.logsumexp(lg, 1))
        best = torch.topk(torch.cat([best, torch.gather(lg, 1, cand)], 1), top, dim=1).values
    return (-torch.expm1(torch.logsumexp(best, 1) - lse)).clamp(min=0).numpy()


def build_indexes(ds, want_ivf: bool, k=None, leaf_size=None):
    t = time.perf_counter()
    emb = EmbeddingIndex.build(ds, k=k, **({} if leaf_size is None else {"leaf_size": leaf_size}))
    t_emb = time.perf_counter() - t
    ivf = t_ivf = None
    if want_ivf:
        t = time.perf_counter()
        ivf = PruneIndex.build(ds, "ivf")
        t_ivf = time.perf_counter() - t
    return emb, t_emb, ivf, t_ivf


def pruned_call(den, u, sigma):
    """One evaluation that pays its search: the neighbour cache cleared first."""
    def call():
        pr = den.pruner()
        if pr is not None:
            pr.cache.clear()
        return den(u, sigma)
    return call


def run(args):
    t = time.perf_counter()
    full = large_patches_dataset(args.size, 1, args.min_std, verify=False)
    ds = subset(full, args.rows, args.seed)
    t_data = time.perf_counter() - t
    emb, t_emb, ivf, t_ivf = build_indexes(ds, args.ivf, args.k, args.leaf_size)
    dense = optden.OptimalDenoiser(ds, prune="off")
    forced = optden.OptimalDenoiser(ds, prune=emb, prune_policy="always")
    auto = optden.OptimalDenoiser(ds, prune=emb, prune_policy="auto")
    with_ivf = optden.OptimalDenoiser(ds, prune=ivf, prune_policy="always") if ivf is not None else None
    tol_mass = mass_tolerance(dense.tol)
    print(f"# {machine()}; commit {commit()}")
    print(f"# data: {ds.M:,} of {full.M:,} textured {args.size}x{args.size} patches (d = {ds.d}), "
          f"{args.queries} queries; tol {dense.tol:g}, tol/10 = {tol_mass:g}; load {t_data:.1f} s; "
          f"embedding index (k = {emb.k}, {emb.nlist} leaves) build {t_emb:.1f} s" + (f", IVF build {t_ivf:.1f} s" if ivf is not None else ""))
    print(f"# OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    rng = np.random.default_rng(args.seed + 1)
    head = (f"{'sigma':>6} {'achievable':>10} {'cert emb':>8} {'cert ivf':>8} {'dense ms':>9} {'emb ms':>8} "
            f"{'ratio':>6} {'dpe':>5} {'auto ms':>8} {'auto ratio':>10} {'ivf ms':>8} {'ivf ratio':>9} {'max rel':>8} "
            f"{'left ms':>8} {'ceiling':>7}")
    print(head)
    for sigma in args.sigmas:
        rows = rng.choice(ds.M, args.queries, replace=False)
        y = ds.raw_rows(np.sort(rows)).to(torch.float64) * ds.scale + ds.offset
        u = y + sigma * torch.from_numpy(rng.standard_normal(tuple(y.shape)))
        tails = true_tails(ds, u, sigma, TOP)
        achievable = float((tails < tol_mass).mean())
        ref = dense(u, sigma)
        ev = forced.denoise_certified(u, sigma)
        cert = float(np.mean([m == "pruned" for m in ev.mode]))
        worst = rel_err(ev.denoised, ref)
        assert float(ev.bound.max()) <= dense.tol, "a pruned evaluation exceeded its certificate's tolerance"
        cert_ivf = float("nan")
        if with_ivf is not None:
            ev_ivf = with_ivf.denoise_certified(u, sigma)
            cert_ivf = float(np.mean([m == "pruned" for m in ev_ivf.mode]))
            worst = max(worst, rel_err(ev_ivf.denoised, ref))
        auto(u, sigma)  # the policy sees this sigma once (as along a trajectory) before it is timed
        # the ceiling of any pruned path that leaves what it cannot certify to the dense pass:
        # that pass alone, for the queries the embedding left uncertified
        left = torch.from_numpy(np.array([m != "pruned" for m in ev.mode]))
        fns = [lambda: dense(u, sigma), pruned_call(forced, u, sigma), pruned_call(auto, u, sigma),
               (lambda: dense(u[left], sigma)) if bool(left.any()) else (lambda: None)]
        if with_ivf is not None:
            fns.append(pruned_call(with_ivf, u, sigma))
        ts = [np.median(t) for t in interleaved_times(fns, args.repeats)]
        t_left = ts[3] if bool(left.any()) else float("nan")
        t_ivf = ts[4] if len(ts) > 4 else float("nan")
        print(f"{sigma:6g} {achievable:10.3f} {cert:8.3f} {cert_ivf:8.3f} {ts[0] * 1e3:9.1f} {ts[1] * 1e3:8.1f} "
              f"{ts[0] / ts[1]:6.2f} {ts[1] / ts[0]:5.2f} {ts[2] * 1e3:8.1f} {ts[0] / ts[2]:10.2f} "
              f"{t_ivf * 1e3:8.1f} {ts[0] / t_ivf:9.2f} {worst:8.1e} {t_left * 1e3:8.1f} {ts[0] / t_left:7.2f}",
              flush=True)
    print("# ratio = dense / pruned (> 1: pruning pays), dpe = pruned / dense; achievable = share of queries whose "
          f"true weight outside their top {TOP} rows is below tol/10; cert = share answered pruned (certified); "
          "left ms = the dense pass for the queries the embedding did not certify, alone; ceiling = dense / left ms, "
          "the most a pruned path that leaves them to the dense pass can gain, its searches free.")
    print(f"# auto decisions: {auto._policy.decisions if auto._policy is not None else None}")
    if args.workloads:
        workloads(args, ds, dense, auto, rng)


def workloads(args, ds, dense, auto, rng):
    """Mean shift at bandwidth ``--bandwidth`` to convergence and memorization (NN1 / NN2) of
    ``--memorize`` samples: dense vs prune="auto" on the embedding index, answers compared.
    Mean shift and sampling run in ``--rounds`` interleaved rounds (median times; auto's
    neighbour cache cleared before each of its runs), memorization once each."""
    print(f"{'workload':>26} {'dense s':>8} {'auto s':>8} {'ratio':>6}  check")
    bw = args.bandwidth
    if bw <= 0:
        return sampling_and_memorization(args, ds, dense, auto, rng)
    rows = np.sort(rng.choice(ds.M, args.queries, replace=False))
    x0 = ds.raw_rows(rows).to(torch.float64) * ds.scale + ds.offset
    x0 = x0 + bw * torch.from_numpy(rng.standard_normal(tuple(x0.shape)))

    def shift(den):
        def run():
            if den.pruner() is not None:
                den.pruner().cache.clear()
            return optden.mean_shift(den, x0, bw, max_iter=100, tol=1e-6, progress=False)
        return run

    (t_dense, t_auto), (ref, got) = interleaved_runs([shift(dense), shift(auto)], args.rounds)
    same = bool(torch.equal(got.nearest_index, ref.nearest_index))
    print(f"{f'mean shift {args.queries} pts, bw {bw:g}':>26} {t_dense:8.2f} {t_auto:8.2f} {t_dense / t_auto:6.2f}  "
          f"same nearest rows: {same}, max rel diff of modes {rel_err(got.modes, ref.modes):.1e}", flush=True)
    sampling_and_memorization(args, ds, dense, auto, rng)


def sampling_and_memorization(args, ds, dense, auto, rng):
    if args.sample > 0:
        sampling_workload(args, dense, auto)
    if args.memorize > 0:
        rows = np.sort(rng.choice(ds.M, args.memorize, replace=False))
        y = ds.raw_rows(rows).to(torch.float64) * ds.scale + ds.offset
        u = y + 0.02 * torch.from_numpy(rng.standard_normal(tuple(y.shape)))  # samples near training rows
        t = time.perf_counter()
        m_ref = optden.memorization(u, dense)
        t_dense = time.perf_counter() - t
        t = time.perf_counter()
        m_got = optden.memorization(u, auto)
        t_auto = time.perf_counter() - t
        same = bool(torch.equal(m_got.memorized, m_ref.memorized))
        gap = float((m_got.nn1_distance - m_ref.nn1_distance).abs().max())
        print(f"{f'memorization {args.memorize}':>26} {t_dense:8.2f} {t_auto:8.2f} {t_dense / t_auto:6.2f}  "
              f"same flags: {same}, max |nn1 diff| {gap:.1e}", flush=True)


def sampling_workload(args, dense, auto):
    """EDM's Heun sampler (18 steps, 35 evaluations), ``--sample`` samples: dense vs
    prune="auto" (its policy learns along the run), samples compared; the share of
    evaluations at sigma <= 0.1 (where pruning can certify) is what auto can save."""
    kw = dict(n=args.sample, steps=18, solver="heun", seed=args.seed, progress=False)
    spent = []  # (sigma, seconds) of each dense evaluation: the time share pruning can save
    plain = dense._denoised  # what every D* call of the sampler runs

    def timed(u, sigma, *a, **k):
        t0 = time.perf_counter()
        out = plain(u, sigma, *a, **k)
        spent.append((float(sigma.max()), time.perf_counter() - t0))
        return out

    dense._denoised = timed
    try:
        optden.sample(dense, **kw)  # once instrumented, for the time share at small sigma
    finally:
        del dense._denoised  # the class's method again
    small_time = sum(x for s_, x in spent if s_ <= 0.1) / max(1e-12, sum(x for _, x in spent))

    def run(den):
        def go():
            if den.pruner() is not None:
                den.pruner().cache.clear()
            return optden.sample(den, **kw)
        return go

    (t_dense, t_auto), (ref, got) = interleaved_runs([run(dense), run(auto)], args.rounds)
    # Heun evaluates at every step's sigma and, but for the last step, at the next one
    s = got.sigmas
    evals = torch.cat([s[:-1], s[1:-1]])
    small = float((evals <= 0.1).double().mean())
    print(f"{f'EDM Heun {args.sample} samples':>26} {t_dense:8.2f} {t_auto:8.2f} {t_dense / t_auto:6.2f}  "
          f"{got.nfe} evaluations, {small:.0%} at sigma <= 0.1 ({small_time:.0%} of the dense time: the most pruning "
          f"them can save is {1 / max(1e-12, 1 - small_time):.2f}x); max rel diff of samples "
          f"{rel_err(got.samples, ref.samples):.1e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8, help="patch size (8: d = 192, 16: d = 768)")
    ap.add_argument("--rows", type=int, default=1_200_000, help="rows drawn from the textured set (0: all)")
    ap.add_argument("--min-std", type=float, default=20.0, help="textured: patch std >= this (0..255 units)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=None, help="embedding directions (default: default_k(d))")
    ap.add_argument("--leaf-size", type=int, default=None, help="rows per leaf, at most (default: the index's)")
    ap.add_argument("--ivf", action="store_true", help="also the FAISS IVF pruned path (optden.prune.index)")
    ap.add_argument("--workloads", action="store_true", help="also mean shift and memorization, dense vs auto")
    ap.add_argument("--bandwidth", type=float, default=0.05, help="mean shift bandwidth (--workloads; 0: no mean shift)")
    ap.add_argument("--memorize", type=int, default=1000, help="samples for memorization (--workloads; 0: none)")
    ap.add_argument("--sample", type=int, default=64, help="samples of an EDM Heun run (--workloads; 0: none)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of mean shift and sampling (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if os.environ.get("OPTDEN_CACHE") is None:
        print("# OPTDEN_CACHE unset: the patch set is built under ~/.cache/optden")
    run(args)


if __name__ == "__main__":
    main()
