"""What the posterior says, and what it costs: diagnostics, covariance products and the
backward of D* against D* itself, the read limit and the naive PyTorch code users write.

Rows M x d uint8 (random, CIFAR-10 size by default, as bench_dense), N queries
``y_i + sigma n``, the cpu backend. Per (N, sigma), timed in interleaved rounds (one call
of each per round, so that load from other jobs falls on all alike; the light calls and
the float64 passes in two groups of rounds, each with D*), median ms and the median over
rounds of the ratio to D* in the same round:

- ``D*``: ``den(x, sigma)`` (cpu backend); ``D* torch backend``: the same on the float64
  torch backend (the arithmetic a streamed product runs); ``diagnostics``: ``den.diagnostics(x, sigma)`` (D* and the
  certified statistics from one pass); ``naive stats fp32``: what users write (fp32
  expansion logits, softmax, then ESS / entropy / log p from the weights);
- ``cov build``: ``den.posterior_cov`` (the certified pass, then each query's support);
  ``matvec J``: ``cov.matvec`` of J vectors per query on the built operator (the support
  held explicitly when it fits, as by default); ``matvec streamed J``: the same with
  ``memory_budget=0`` (every product one float64 pass over the rows); ``naive cov fp32``:
  fp32 weights, then ``sum w (y - D)((y - D) . v)`` in row chunks;
- ``D* + vjp``: forward and backward of a differentiable call (``x.requires_grad``;
  the backward builds the covariance and takes one product);
- ``plain-call check``: the test ``optden.autograd.needs_autograd`` that every plain call
  now makes before its usual path (the whole cost of autograd support for them).

"/ read" is one read of the M d bytes at the read bandwidth measured first (torch sum
over a 1 GiB array) over the time. Errors, on the first rows of the data: the largest
error of the diagnostics over the contract's scale (docs/design.md, section 2) and of the
matvecs over ||C||_2 ||v||, against the float64 oracle (optden.reference).

    python bench/bench_posterior.py            # the full table (minutes)
    python bench/bench_posterior.py --quick    # a smoke run at tiny shapes (seconds)
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import commit, interleaved_times, machine, times

import optden
from optden import autograd as AG
from optden import reference as R
from optden.posterior import DIAGNOSTIC_FIELDS, contract_scale


def read_bandwidth(nbytes: int, repeats: int) -> float:
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / min(times(lambda: x.sum(), repeats)) / 1e9


def naive_weights(x: torch.Tensor, Y: torch.Tensor, ysq: torch.Tensor, sigma: float, chunk: int):
    """fp32 expansion logits in row chunks and their softmax: (weights (N, M), logits (N, M))."""
    xsq = (x * x).sum(1, keepdim=True)
    lg = torch.empty(x.shape[0], Y.shape[0])
    for a in range(0, Y.shape[0], chunk):
        lg[:, a:a + chunk] = -(xsq - 2.0 * x @ Y[a:a + chunk].T + ysq[a:a + chunk]) / (2.0 * sigma**2)
    return torch.softmax(lg, dim=1), lg


def naive_stats(x, Y, ysq, sigma, chunk):
    """ESS, entropy, max weight, log p as users write them, from fp32 weights."""
    w, lg = naive_weights(x, Y, ysq, sigma, chunk)
    ess = 1.0 / (w * w).sum(1)
    entropy = -(w * torch.log(w.clamp(min=1e-30))).sum(1)
    d = Y.shape[1]
    log_p = torch.logsumexp(lg, 1) - np.log(Y.shape[0]) - 0.5 * d * np.log(2 * np.pi * sigma**2)
    return {"ess": ess, "entropy": entropy, "max_weight": w.max(1).values, "log_p": log_p}


def naive_cov_matvec(x, Y, ysq, sigma, V, chunk):
    """sum_i w_i (y_i - D)((y_i - D) . v) in fp32: V (N, d, J) -> (N, d, J)."""
    w, _ = naive_weights(x, Y, ysq, sigma, chunk)
    D = w @ Y
    out = torch.zeros_like(V)
    for a in range(0, Y.shape[0], chunk):
        B = Y[a:a + chunk][None] - D[:, None, :]  # (N, c, d)
        proj = torch.einsum("ncd,ndj->ncj", B, V) * w[:, a:a + chunk, None]
        out += torch.einsum("ncd,ncj->ndj", B, proj)
    return out


def errors(raw, sigmas, m_err, chunk, rng) -> dict:
    """Largest errors against the float64 oracle on the first m_err rows (3 queries per sigma)."""
    sub = optden.Dataset.from_array(raw[:m_err])
    y = sub.model_rows(np.arange(sub.M)).numpy()
    Y = torch.from_numpy(y).float()
    ysq = (Y * Y).sum(1)
    den = optden.OptimalDenoiser(sub, backend="cpu")
    out = {"diagnostics": 0.0, "naive stats fp32": 0.0, "matvec": 0.0, "matvec streamed": 0.0,
           "naive cov fp32": 0.0, "D* + vjp": 0.0}
    for sigma in sigmas:
        x = y[rng.integers(0, sub.M, 3)] + sigma * rng.standard_normal((3, sub.d))
        xt = torch.from_numpy(x)
        ref = R.diagnostics(x, y, sigma)
        dg = den.diagnostics(xt, sigma)
        naive = naive_stats(xt.float(), Y, ysq, sigma, chunk)
        for name in DIAGNOSTIC_FIELDS:
            scale = contract_scale(name, torch.from_numpy(ref[name]), sub.d, torch.full((3,), sigma)).numpy()
            out["diagnostics"] = max(out["diagnostics"], float((np.abs(getattr(dg, name).numpy() - ref[name]) / scale).max()))
            if name in naive:
                e = np.abs(naive[name].double().numpy() - ref[name]) / scale
                out["naive stats fp32"] = max(out["naive stats fp32"], float(np.nan_to_num(e, nan=np.inf).max()))
        C = R.posterior_cov(x, y, sigma)
        norm = np.linalg.norm(C, ord=2, axis=(1, 2))
        if norm.min() < 1e-200:  # concentrated on one row: no relative error to speak of
            continue
        V = rng.standard_normal((3, sub.d, 2))
        ref_cv = np.einsum("nij,njk->nik", C, V)
        scale = norm[:, None] * np.linalg.norm(V, axis=1)

        def err(cv, ok=None):
            e = np.linalg.norm(np.asarray(cv, dtype=np.float64) - ref_cv, axis=1) / scale
            return float(e.max() if ok is None else (e[ok].max() if ok.any() else 0.0))

        out["matvec"] = max(out["matvec"], err(den.posterior_cov(xt, sigma).matvec(torch.from_numpy(V))))
        # streamed products are certified relatively where the posterior is spread (what they are
        # for: supports too large to hold); where it is concentrated their error is absolute
        # (~1e-16 of the rows' size), and their rel_bound says so: count those, time them all
        st = den.posterior_cov(xt, sigma, memory_budget=0)
        ok = st.certified.numpy()
        out["streamed certified"] = out.get("streamed certified", 0) + int(ok.sum())
        out["streamed queries"] = out.get("streamed queries", 0) + len(ok)
        out["matvec streamed"] = max(out["matvec streamed"], err(st.matvec(torch.from_numpy(V)), ok))
        out["naive cov fp32"] = max(out["naive cov fp32"], err(
            naive_cov_matvec(xt.float(), Y, ysq, sigma, torch.from_numpy(V).float(), chunk).double()))
        xg = xt.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(den(xg, sigma), xg, torch.from_numpy(V[:, :, 0]))
        jv = (g.numpy() * sigma**2)[:, :, None]  # J^T v = C v / sigma^2
        out["D* + vjp"] = max(out["D* + vjp"], err(np.concatenate([jv, ref_cv[:, :, 1:]], 2)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=3072)
    ap.add_argument("--N", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 20.0])
    ap.add_argument("--J", type=int, nargs="+", default=[1, 8], help="vectors per query of the matvecs")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--err-sigmas", type=float, nargs="+", default=[0.1, 1.0, 20.0, 1e3])
    ap.add_argument("--err-rows", type=int, default=2000)
    ap.add_argument("--bw-bytes", type=int, default=1 << 30)
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out (names as in the table)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch (and OpenMP) threads; 1 keeps small ops from waiting on a busy shared machine")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.M, args.d, args.N, args.repeats, args.J = 600, 75, [1, 3], 2, [1, 4]
        args.err_sigmas, args.err_rows, args.bw_bytes = [0.3, 3.0], 300, 1 << 22

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    print(f"# bench_posterior: {machine()}; commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"rows M = {args.M} x d = {args.d} uint8")
    bw = read_bandwidth(args.bw_bytes, 5)
    raw = rng.integers(0, 256, (args.M, args.d), dtype=np.uint8)
    nbytes = raw.nbytes
    print(f"# read bandwidth {bw:.1f} GB/s: one read of the rows {nbytes / bw / 1e6:.1f} ms")
    ds = optden.Dataset.from_array(raw)
    den = optden.OptimalDenoiser(ds, backend="cpu")
    den_torch = optden.OptimalDenoiser(ds, backend="torch")  # the float64 pass the streamed products run
    chunk = max(1, (1 << 26) // (4 * ds.d))
    Y = ds.model_rows(np.arange(ds.M)).float()
    ysq = (Y * Y).sum(1)
    err = errors(raw, args.err_sigmas, min(args.err_rows, ds.M), chunk, rng)
    print(f"# errors on the first {min(args.err_rows, ds.M)} rows at sigma {args.err_sigmas} (3 queries each); the "
          f"streamed matvec's over the {err['streamed certified']} of {err['streamed queries']} queries it certifies "
          f"(the others: C concentrated on a few rows, an absolute error; the held supports certify them)")

    print(f"\n| method | N | sigma | J | median ms | / D* (same rounds) | / read | max error |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.N:
        base = ds.model_rows(rng.integers(0, ds.M, n)).numpy()
        for s in args.sigmas:
            x = torch.from_numpy(base + s * rng.standard_normal(base.shape))
            xf = x.float()
            cov = den.posterior_cov(x, s)
            stream = den.posterior_cov(x, s, memory_budget=0)
            g = torch.from_numpy(rng.standard_normal(x.shape))
            light = [("D*", None, lambda: den(x, s)),
                     ("diagnostics", None, lambda: den.diagnostics(x, s))]
            heavy = [("D*", None, lambda: den(x, s)),
                     ("D* torch backend", None, lambda: den_torch(x, s)),
                     ("naive stats fp32", None, lambda: naive_stats(xf, Y, ysq, s, chunk)),
                     ("cov build", None, lambda: den.posterior_cov(x, s))]
            for J in args.J:
                V = torch.from_numpy(rng.standard_normal((n, ds.d, J)))
                Vf = V.float()
                light.append(("matvec", J, lambda V=V: cov.matvec(V)))
                heavy += [("matvec streamed", J, lambda V=V: stream.matvec(V)),
                          ("naive cov fp32", J, lambda Vf=Vf: naive_cov_matvec(xf, Y, ysq, s, Vf, chunk))]

            def vjp():
                xg = x.clone().requires_grad_(True)
                return torch.autograd.grad(den(xg, s), xg, g)

            heavy.append(("D* + vjp", None, vjp))
            light.append(("plain-call check", None, lambda: AG.needs_autograd(x, s, 1.0)))
            # two groups of rounds, each with D* for the same-round ratio: the heavy float64 passes
            # leave the caches and the kernel's huge pages to clean up, which would slow the
            # light calls after them in a shared round
            for group in (light, heavy):
                runs = [r for r in group if r[0] not in args.skip or r[0] == "D*"]
                ts = interleaved_times([r[2] for r in runs], args.repeats)
                for (name, J, _), t in zip(runs, ts):
                    if group is heavy and name == "D*":
                        continue
                    ratio = statistics.median([a / b for a, b in zip(t, ts[0])])
                    e = err.get(name)
                    print(f"| {name} | {n} | {s:g} | {J or '-'} | {statistics.median(t) * 1e3:.3f} | {ratio:.3g} | "
                          f"{nbytes / (bw * 1e9) / statistics.median(t):.3g} | "
                          f"{'-' if e is None else f'{e:.1e}'} |")
            print(f"|  | {n} | {s:g} | | modes {','.join(sorted(set(cov.mode)))}; support rows "
                  f"{cov.support_rows} | | | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
