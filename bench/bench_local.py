"""Local denoisers (LS, ELS, patch composite): optden's LocalDenoiser against naive PyTorch
versions written as the public code writes them, with the machine's limits measured in
the same run.

Data: CIFAR-10-size images (3 x 32 x 32 uint8) cut at random places from the photographs
bundled with scikit-image and scikit-learn (nothing is downloaded). Queries ``y_i + sigma n``
at EDM's sigmas (model space [-1, 1]). Rows of the table:

* ``optden-local`` / ``optden-composite`` at M = 50,000, batch 64, k = 5; ``optden-els`` at
  M in {250, 500, 1000, 2000}, batch 16, k = 5 (the issue's targets: <= 2 s and <= 30 s per
  certified evaluation): ``LocalDenoiser.denoise_certified``, exact to the contract, with
  its modes.
* ``naive-ls``: Kamb & Ganguli's ``LocalScoreModule`` as it computes (utils/idealscore.py
  of Kambm/convolutional_diffusion): per batch of training images, the (B, NP, C, H, W)
  differences, F.unfold of their squared norms for the k x k sums, logits against a
  running max shared by the whole batch and all positions, and the *means* of
  exp-weighted values per batch (its normalisation); fp32; zero padding.
* ``naive-els``: their ``LocalEquivScoreModule``: the valid patches of each batch of images
  as conv2d filters on the circularly padded queries, the same shared max and batch means,
  the center pixels as values; fp32.
* ``naive-composite``: the composite as users write it with F.unfold / F.fold: per
  position a softmax of the k x k patch distances (fp32, max per position), the weighted
  patch means folded back and divided by the window counts.

The naive versions are timed at M_naive rows and scaled to the row's M by M / M_naive
(their cost is linear in M); the scaled time is marked "(scaled)". Each is also measured
for accuracy: max relative error of the image against the float64 oracle
(``optden.reference.local``) on a small problem (``--err-rows`` images; the naive ones
compute their own definitions: LS with zero padding, ELS over the valid patches only;
their oracles are computed to match).

Limits (the same run): the float64 matmul rate (torch, 2048^3: the float64 arithmetic's
limit), the read bandwidth (torch sum over 512 MiB), and exp's rate (torch.exp over 2^24
float64).
Work of one evaluation: pairs = B M (ELS: B M HW shifts), each of HW positions costing
the box-sum algorithm's flops (C subtractions and multiply-adds, 2 (k - 1) adds, the
logit, the online update's 2 C + 4) and one exp; "/ fp64 peak" is the flops' rate over
the peak, "/ exp rate" the exps' rate over exp's rate.

    python bench/bench_local.py             # the full table (about 10 minutes on 2 cores)
    python bench/bench_local.py --quick     # tiny sizes, seconds
    python bench/bench_local.py --device cuda   # the GPU step (bench/gpu_check.sh), <= 90 s on an H100
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import HERE, commit, machine, rel_err

import optden
from optden import reference as R
from optden.local import LocalDenoiser

EDM_SIGMAS = (0.002, 0.05, 0.5, 5.0, 80.0)
#: Issue 21's targets on this 2-core CPU: {(kind, M, B): seconds per certified evaluation}.
ISSUE_TARGETS = {("local", 50_000, 64): 2.0, ("composite", 50_000, 64): 2.0, ("equivariant", 2_000, 16): 30.0}


# ----------------------------------------------------------------------------- data and limits
def cifar_like(m: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """m uint8 images (3, size, size) cut at random places from the bundled photographs."""
    from optden.data.demo import source_pictures

    pics = [p for _, p in source_pictures()]
    rng = np.random.default_rng(seed)
    out = np.empty((m, 3, size, size), dtype=np.uint8)
    for j in range(m):
        p = pics[j % len(pics)]
        y0, x0 = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        out[j] = p[y0 : y0 + size, x0 : x0 + size].transpose(2, 0, 1)
    return out


def limits(device: torch.device) -> dict:
    """float64 matmul rate (GFLOP/s, 2048^3; the fp64 arithmetic's limit), read bandwidth
    (GB/s, torch sum over 512 MiB), float64 exp rate (G/s, torch.exp over 2^24 values)."""
    out = {}
    n = 2048
    a = torch.randn(n, n, dtype=torch.float64, device=device)
    out["fp64_gflops"] = 2 * n**3 / min(_seconds(lambda: a @ a, device) for _ in range(3)) / 1e9
    x = torch.ones(1 << 27, dtype=torch.float32, device=device)
    out["bandwidth_GBs"] = x.numel() * 4 / min(_seconds(lambda: x.sum(), device) for _ in range(3)) / 1e9
    e = torch.rand(1 << 24, dtype=torch.float64, device=device) * -40
    out["exp_Gs"] = e.numel() / min(_seconds(lambda: torch.exp(e), device) for _ in range(3)) / 1e9
    return out


def _seconds(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def work(kind: str, B: int, M: int, shape, k: int) -> tuple[float, float]:
    """(flops, exps) of one evaluation by the box-sum algorithm (module docstring)."""
    C, H, W = shape
    pairs = B * M * (H * W if kind == "equivariant" else 1)
    per_pos = 3 * C + 2 * (k - 1) + 1 + 2 * C + 4
    passes = 2 if kind == "composite" else 1  # the composite's second pass recomputes the logits
    return float(pairs * H * W * per_pos * passes), float(pairs * H * W * passes)


# ----------------------------------------------------------------------------- naive baselines
def _shared_max_weights(args, sub, num, den):
    """The public code's running max: one over the whole batch of queries and every position
    (amax over dims 0 and 1), rescaling num and den in place when it grows. Returns
    (exp(args - max), the new max)."""
    new = torch.amax(args, dim=(0, 1), keepdim=True)
    if sub is None:
        sub = new
    else:
        upd = torch.maximum(new, sub)
        num /= torch.exp(upd - sub)
        den /= torch.exp(upd - sub)[:, 0]
        sub = upd
    return torch.exp(args - sub), sub


def naive_ls(x, images, sigma: float, k: int, batch: int = 256):
    """LS as Kamb & Ganguli's LocalScoreModule computes it (VE: a_t = 1, b_t = sigma), as a
    denoiser D = x - numerator / denominator. x (b, C, H, W), images (M, C, H, W) fp32."""
    b, c, h, w = x.shape
    num = torch.zeros_like(x)
    den = torch.zeros(b, h, w, dtype=x.dtype, device=x.device)
    sub = None
    for a in range(0, images.shape[0], batch):
        ims = images[a : a + batch]
        n = ims.shape[0]
        diffs = x[:, None] - ims[None]  # (b, NP, C, H, W)
        sq = (diffs**2).sum(2)
        patches = F.unfold(sq, k, padding=k // 2).view(b, n, k * k, h, w)
        args = -patches.sum(2) / (2 * sigma**2)  # (b, NP, H, W)
        ev, sub = _shared_max_weights(args, sub, num, den)
        num += (ev[:, :, None] * diffs).mean(1)
        den += ev.mean(1)
    return x - num / den[:, None]


def naive_els(x, images, sigma: float, k: int, batch: int = 64):
    """ELS as LocalEquivScoreModule computes it (circular queries, valid training patches as
    conv2d filters, shared max, batch means), as a denoiser D = x - num / den."""
    b, c, h, w = x.shape
    r = k // 2
    xp = F.pad(x, (r, r, r, r), mode="circular")
    xnorm = (F.unfold(xp, k) ** 2).sum(1).view(b, h, w)
    num = torch.zeros_like(x)
    den = torch.zeros(b, h, w, dtype=x.dtype, device=x.device)
    sub = None
    for a in range(0, images.shape[0], batch):
        ims = images[a : a + batch]
        p = F.unfold(ims, k).permute(2, 0, 1).reshape(-1, c, k, k)  # (NP, C, k, k) valid patches
        pnorm = (p**2).sum((1, 2, 3))
        centers = p[:, :, r, r]
        args = -(xnorm[:, None] - 2 * F.conv2d(xp, p) + pnorm[None, :, None, None]) / (2 * sigma**2)
        ev, sub = _shared_max_weights(args, sub, num, den)
        num += (ev[:, :, None] * (x[:, None] - centers[None, :, :, None, None])).mean(1)
        den += ev.mean(1)
    return x - num / den[:, None]


def naive_composite(x, images, sigma: float, k: int, batch: int = 64):
    """The composite as users write it: F.unfold patches (circular), per-position softmax of
    the patch distances (max per position, two passes over the rows), weighted patch means
    folded back with F.fold and divided by the window counts; fp32."""
    b, c, h, w = x.shape
    r = k // 2
    xq = F.unfold(F.pad(x, (r, r, r, r), mode="circular"), k)  # (b, C k^2, HW)

    def patches(ims):
        return F.unfold(F.pad(ims, (r, r, r, r), mode="circular"), k)  # (n, C k^2, HW)

    def logits(ims):
        return -((xq[:, None] - patches(ims)[None]) ** 2).sum(2) / (2 * sigma**2)  # (b, n, HW)

    m = torch.full((b, h * w), -math.inf, dtype=x.dtype, device=x.device)
    for a in range(0, images.shape[0], batch):
        m = torch.maximum(m, logits(images[a : a + batch]).amax(1))
    s = torch.zeros(b, h * w, dtype=x.dtype, device=x.device)
    acc = torch.zeros_like(xq)
    for a in range(0, images.shape[0], batch):
        ims = images[a : a + batch]
        e = torch.exp(logits(ims) - m[:, None])
        s += e.sum(1)
        acc += torch.einsum("bnp,ncp->bcp", e, patches(ims))
    mean = acc / s[:, None]
    ones = torch.ones(1, c * k * k, h * w, dtype=x.dtype, device=x.device)
    fold = lambda t: F.fold(t, (h + 2 * r, w + 2 * r), k)  # noqa: E731
    def unwrap(t):  # the circular padding's margins back onto the image
        t = t.clone()
        t[..., r : 2 * r, :] += t[..., h + r :, :]
        t[..., h : h + r, :] += t[..., :r, :]
        t[..., :, r : 2 * r] += t[..., :, w + r :]
        t[..., :, w : w + r] += t[..., :, :r]
        return t[..., r : h + r, r : w + r]
    return unwrap(fold(mean)) / unwrap(fold(ones))


NAIVE = {"local": naive_ls, "equivariant": naive_els, "composite": naive_composite}
NAIVE_PADDING = {"local": "zero", "equivariant": "circular", "composite": "circular"}


# ----------------------------------------------------------------------------- accuracy
def errors(kinds, sigmas, k: int, m_err: int, device, rng, backend: str = "auto", size: int = 32) -> dict:
    """{(method, kind): max relative error of the image} against the float64 oracles on
    m_err images (ELS: m_err // 4), two queries y_i + sigma n per sigma (the public code's
    running max is shared by the queries of a batch)."""
    out = {}
    for kind in kinds:
        m = max(2, m_err // 4) if kind == "equivariant" else m_err
        ds = optden.Dataset.from_array(cifar_like(m, seed=7, size=size))
        y = ds.images(np.arange(m)).numpy()
        oracle = {"local": R.local_denoise, "equivariant": R.equivariant_denoise,
                  "composite": R.composite_denoise}[kind]
        den = LocalDenoiser(ds, k, kind=kind, padding="circular", device=device, backend=backend)
        ys = torch.from_numpy(y).float().to(device)
        for sigma in sigmas:
            x = y[:2] + sigma * rng.standard_normal(y[:2].shape)
            ref = oracle(x, y, sigma, k, "circular")
            got = den(torch.from_numpy(x).to(device), sigma).cpu()
            out[("optden", kind)] = max(out.get(("optden", kind), 0.0), rel_err(got, ref))
            if kind == "equivariant":  # the public ELS compares with the valid patches only
                ref = naive_els_oracle(x, y, sigma, k)
            elif kind == "local":
                ref = oracle(x, y, sigma, k, "zero")
            with torch.no_grad():
                nv = NAIVE[kind](torch.from_numpy(x).float().to(device), ys, sigma, k).double().cpu()
            e = rel_err(nv, ref) if bool(torch.isfinite(nv).all()) else math.inf
            out[("naive", kind)] = max(out.get(("naive", kind), 0.0), e)
    return out


def naive_els_oracle(x, y, sigma: float, k: int) -> np.ndarray:
    """float64 ELS of the public definition: circular query windows against the valid
    (uncut) windows of the training images, center pixels as values. (N, C, H, W)."""
    n, c, h, w = x.shape
    r = k // 2
    X = torch.from_numpy(x)
    Y = torch.from_numpy(y)
    xq = F.unfold(F.pad(X, (r, r, r, r), mode="circular"), k)  # (n, C k^2, HW)
    yp = F.unfold(Y, k).permute(0, 2, 1).reshape(-1, c * k * k)  # (M P, C k^2)
    centers = yp.reshape(-1, c, k * k)[:, :, (k * k) // 2]  # (M P, C)
    out = torch.empty(n, c, h * w, dtype=torch.float64)
    for b in range(n):
        for p in range(h * w):
            lg = -((xq[b, :, p][None] - yp) ** 2).sum(1) / (2 * sigma**2)
            wgt = torch.softmax(lg, 0)
            out[b, :, p] = wgt @ centers
    return out.reshape(n, c, h, w).numpy()


# ----------------------------------------------------------------------------- the runs
def time_optden(den, x, sigma, repeats: int, device):
    """(median s, best s, modes) of denoise_certified."""
    ts, ev = [], None
    for _ in range(repeats):
        t = _seconds(lambda: None, device)  # sync
        t0 = time.perf_counter()
        ev = den.denoise_certified(x, sigma)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0 + 0 * t)
    modes = ",".join(f"{m}:{c}" for m, c in sorted(ev.modes().items()))
    return statistics.median(ts), min(ts), modes


def time_naive(kind, x32, images32, sigma, k, repeats: int, device, batch: int):
    ts = []
    for _ in range(repeats):
        with torch.no_grad():
            ts.append(_seconds(lambda: NAIVE[kind](x32, images32, sigma, k, batch), device))
    return statistics.median(ts), min(ts)


def run_kind(kind, M, B, k, sigmas, raw, args, device, lim, rows, rng):
    """Time optden and the naive version of one kind at M rows, batch B; append to rows."""
    ds = optden.Dataset.from_array(raw[:M])
    den = LocalDenoiser(ds, k, kind=kind, padding="circular", device=device, backend=args.backend)
    m_naive = min(M, args.naive_rows if kind != "equivariant" else args.naive_rows_els)
    images32 = ds.images(np.arange(m_naive)).float().to(device)
    base = ds.images(rng.integers(0, M, B))
    flops, exps = work(kind, B, M, ds.image_shape, k)
    for sigma in sigmas:
        x = (base + sigma * torch.randn(base.shape, dtype=torch.float64)).to(device)
        t, tmin, modes = time_optden(den, x, sigma, args.repeats, device)
        rows.append(_row("optden", kind, M, B, k, sigma, t, tmin, False, flops, exps, lim, modes))
        _print(rows[-1])
    if "naive" in args.skip:
        return
    x32 = (base + sigmas[-1] * torch.randn(base.shape, dtype=torch.float64)).float().to(device)
    batch = args.naive_batch_els if kind == "equivariant" else args.naive_batch
    t, tmin = time_naive(kind, x32, images32, sigmas[-1], k, max(1, args.repeats // 2), device, batch)
    scale = M / m_naive
    rows.append(_row("naive", kind, M, B, k, sigmas[-1], t * scale, tmin * scale, scale > 1, flops, exps, lim, "-"))
    _print(rows[-1])


def _row(method, kind, M, B, k, sigma, t, tmin, scaled, flops, exps, lim, modes) -> dict:
    return {"method": method, "kind": kind, "M": M, "B": B, "k": k, "sigma": sigma, "time_s": t, "best_s": tmin,
            "scaled": scaled, "GFLOP/s": flops / t / 1e9, "vs_fp64_peak": flops / t / 1e9 / lim["fp64_gflops"],
            "Gexp/s": exps / t / 1e9, "vs_exp_rate": exps / t / 1e9 / lim["exp_Gs"], "modes": modes}


def _print(r: dict) -> None:
    print(f"{r['method']:>7} {r['kind']:>12} M={r['M']:<6} B={r['B']:<3} sigma={r['sigma']:<6g} "
          f"{r['time_s']:9.3f} s{' (scaled)' if r['scaled'] else ''} (best {r['best_s']:.3f}) "
          f"{r['GFLOP/s']:7.1f} GFLOP/s ({r['vs_fp64_peak']:.2f} fp64 peak) {r['Gexp/s']:6.2f} Gexp/s "
          f"({r['vs_exp_rate']:.2f} exp rate) {r['modes']}", flush=True)


# ----------------------------------------------------------------------------- main
def plan(args) -> list:
    """[(kind, M, B)] of the run."""
    if args.gpu_step:
        return [("local", args.M, args.B), ("equivariant", max(args.els_M), args.els_B)]
    out = [("local", args.M, args.B), ("composite", args.M, args.B)]
    return out + [("equivariant", m, args.els_B) for m in args.els_M]


def table(rows: list, err: dict, targets: dict) -> None:
    print()
    print("| method | kind | M | B | sigma | median s | best s | GFLOP/s | / fp64 peak | Gexp/s | / exp rate | "
          "speed-up vs naive | max rel err (oracle) | modes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        nv = next((q for q in rows if q["method"] == "naive" and q["kind"] == r["kind"] and q["M"] == r["M"]), None)
        sp = f"{nv['time_s'] / r['time_s']:.1f}" if nv and r["method"] == "optden" else "-"
        e = err.get((r["method"], r["kind"]), math.nan)
        print(f"| {r['method']} | {r['kind']} | {r['M']} | {r['B']} | {r['sigma']:g} | "
              f"{r['time_s']:.3f}{' (scaled)' if r['scaled'] else ''} | {r['best_s']:.3f} | {r['GFLOP/s']:.1f} | "
              f"{r['vs_fp64_peak']:.2f} | {r['Gexp/s']:.2f} | {r['vs_exp_rate']:.2f} | {sp} | {e:.1e} | {r['modes']} |")
    for (kind, M, B), limit in targets.items():
        got = [r for r in rows if r["method"] == "optden" and r["kind"] == kind and r["M"] == M and r["B"] == B]
        if got:
            worst = max(got, key=lambda r: r["time_s"])
            print(f"# target {kind} M={M} B={B} <= {limit:g} s: worst sigma {worst['sigma']:g} {worst['time_s']:.2f} s "
                  f"({'met' if worst['time_s'] <= limit else 'NOT met'}); "
                  + ", ".join(f"sigma {r['sigma']:g}: {r['time_s']:.2f} s" for r in got))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu (default without CUDA) or cuda")
    ap.add_argument("--gpu-step", action="store_true",
                    help="the GPU step: LS at M x B and ELS at the largest ELS M, torch backend, naive at full size "
                         "(default with --device cuda)")
    ap.add_argument("--M", type=int, default=50_000, help="training images of LS and the composite")
    ap.add_argument("--B", type=int, default=64, help="query batch of LS and the composite")
    ap.add_argument("--els-M", type=int, nargs="+", default=[250, 500, 1000, 2000], help="training images of ELS")
    ap.add_argument("--els-B", type=int, default=16, help="query batch of ELS")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--size", type=int, default=32, help="images are 3 x size x size (CIFAR-10: 32)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=list(EDM_SIGMAS))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--naive-rows", type=int, default=1000, help="rows the naive LS / composite are timed at")
    ap.add_argument("--naive-rows-els", type=int, default=125, help="rows the naive ELS is timed at")
    ap.add_argument("--naive-batch", type=int, default=256, help="training images per batch of the naive LS")
    ap.add_argument("--naive-batch-els", type=int, default=None,
                    help="training images per batch of the naive ELS / composite (default 4 on CPU, 64 on CUDA: "
                         "the public default; CPU memory holds fewer)")
    ap.add_argument("--err-rows", type=int, default=40, help="images of the accuracy problem")
    ap.add_argument("--skip", nargs="*", default=[], help="leave out: naive errors")
    ap.add_argument("--csv", default=str(HERE / "bench_local.csv"))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        args.gpu_step = True
        args.naive_rows = args.naive_rows_els = 10**9  # the naive ones at full size on the GPU
    args.backend = "torch" if args.gpu_step else "auto"  # the GPU step runs (and its dry run tests) the torch passes
    if args.naive_batch_els is None:
        args.naive_batch_els = 64 if device.type == "cuda" else 4
    if args.gpu_step and device.type == "cuda" and args.sigmas == list(EDM_SIGMAS):
        args.sigmas = [0.05, 0.5]
    if args.quick:
        args.M, args.B, args.els_M, args.els_B, args.repeats = 60, 3, [12], 2, 1
        args.sigmas, args.err_rows, args.naive_rows, args.naive_rows_els = [0.05, 2.0], 8, 30, 6
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    print(f"# bench_local: {machine()}; commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"device {device}; images 3x{args.size}x{args.size} uint8 cut from the bundled photographs; k = {args.k}")
    lim = limits(device)
    print(f"# limits: float64 matmul {lim['fp64_gflops']:.1f} GFLOP/s, read bandwidth "
          f"{lim['bandwidth_GBs']:.1f} GB/s, float64 exp {lim['exp_Gs']:.2f} G/s")
    raw = cifar_like(max(m for _, m, _ in plan(args)), seed=args.seed, size=args.size)
    rows = []
    for kind, M, B in plan(args):
        run_kind(kind, M, B, args.k, args.sigmas, raw, args, device, lim, rows, rng)
    err = {} if "errors" in args.skip else errors(sorted({k for k, _, _ in plan(args)}), (1e-3, 0.1, 10.0),
                                                   args.k, args.err_rows, device, rng, args.backend, args.size)
    for (method, kind), e in sorted(err.items()):
        print(f"# accuracy {method:>6} {kind:>12}: max relative error of the image {e:.2e}")
    targets = {key: limit for key, limit in ISSUE_TARGETS.items()
               if key in {("local", args.M, args.B), ("composite", args.M, args.B), ("equivariant", max(args.els_M),
                                                                                    args.els_B)}}
    if not targets:
        print("# the issue's targets are at LS / composite M = 50000 B = 64 and ELS M = 2000 B = 16: not in this run")
    table(rows, err, targets)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["max_rel_err"] + list(lim))
            w.writeheader()
            for r in rows:
                w.writerow({**r, "max_rel_err": err.get((r["method"], r["kind"]), math.nan), **lim})
        print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
