"""Dense pass of the optimal denoiser on this CPU: optden's cpu and torch backends against
the naive PyTorch fp32 code users write, with the machine's limits measured in the same run.

Shapes: N queries in {1, 8, 64, 512}, M = 50,000 rows of d = 3072 uint8 (CIFAR-10 size),
random data. Queries are ``y_i + sigma * n``. Reported per row: median time of repeats,
GFLOP/s with FLOPs = 4 N M d (the dense pass: distances and weighted sum), GB/s for one
read of the data (M d bytes of uint8; --dtype float16 / bfloat16 / float32 stores the same
images as floats, read by the cpu backend's float64 path), and their ratios to the measured limits: the fp32 and
bf16 matmul rates (torch.matmul at 4096^2), the memory read bandwidth (torch sum over
a 1 GiB float32 array), each the best of its repeats, and the int8 multiply-add peak of
the vector units (vpdpbusd, optden._C.cpu_peaks; "/ int8" counts 2 N M d multiply-adds). The methods are timed in
interleaved rounds (one call of each per round) so that load from other jobs on a shared
machine falls on all of them alike, except the torch backend, timed in rounds of its own
right after (the run that followed it in a shared round was slowed by the kernel's work on
the huge pages it had freed); the table gives the median and the best time. A read
probe (torch sum over the data's size in float32) runs in every shared round too, and
"/ bandwidth, same rounds" is the median over rounds of probe time / run time: this VM
shares its memory bandwidth, which moved between 30 and 53 GB/s from one run to the next,
so the limit measured once at the start can be from another phase than the runs. The error of each method is its max relative error of D* against
the float64 oracle (optden.reference) on the first rows of the data at a few sigmas.

    python bench/bench_dense.py            # the full table (minutes)
    python bench/bench_dense.py --quick    # a smoke run at tiny shapes (seconds)
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time

import numpy as np
import torch
from _common import HERE, commit, interleaved_times, machine, rel_err, times

import optden
from optden import reference as R


def matmul_rate(dtype: torch.dtype, n: int, repeats: int) -> float:
    """GFLOP/s of torch.matmul of two n x n matrices in dtype."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    t = min(times(lambda: torch.matmul(a, b), repeats))
    return 2.0 * n**3 / t / 1e9


def read_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of one read of a float32 array of nbytes (torch sum, all threads)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    t = min(times(lambda: x.sum(), repeats))
    return nbytes / t / 1e9


def naive_fp32(x: torch.Tensor, Y: torch.Tensor, ysq: torch.Tensor, sigma: float, chunk: int) -> torch.Tensor:
    """What users write: fp32 expansion logits in row chunks, softmax, weights @ Y.

    x: (N, d) fp32 model space; Y: (M, d) fp32; ysq: (M,) fp32. Returns D* (N, d) fp32.
    """
    xsq = (x * x).sum(1, keepdim=True)
    logits = torch.empty(x.shape[0], Y.shape[0])
    for a in range(0, Y.shape[0], chunk):
        yc = Y[a : a + chunk]
        logits[:, a : a + chunk] = -(xsq - 2.0 * x @ yc.T + ysq[a : a + chunk]) / (2.0 * sigma**2)
    w = torch.softmax(logits, dim=1)
    out = torch.zeros(x.shape[0], Y.shape[1])
    for a in range(0, Y.shape[0], chunk):
        out += w[:, a : a + chunk] @ Y[a : a + chunk]
    return out


def vector_peaks() -> dict:
    """Peak rates of the instructions the cpu backend is built from (optden._C.cpu_peaks),
    or {} where the extension or AVX-512 VNNI is missing."""
    C = optden._ext.C
    if C is None or not hasattr(C, "cpu_peaks"):
        return {}
    try:
        return dict(C.cpu_peaks())
    except RuntimeError:
        return {}


def errors(raw: np.ndarray, sigmas, n_err: int, m_err: int, chunk: int, rng) -> dict:
    """Max relative error of D* against the float64 oracle on the first m_err rows."""
    sub = optden.Dataset.from_array(raw[:m_err])
    y = sub.model_rows(np.arange(sub.M)).numpy()
    Y = torch.from_numpy(y).float()
    ysq = (Y * Y).sum(1)
    dens = {b: optden.OptimalDenoiser(sub, backend=b) for b in ("cpu", "torch")}
    worst = {"cpu": 0.0, "torch": 0.0, "naive_fp32": 0.0}
    for sigma in sigmas:
        x = y[rng.integers(0, sub.M, n_err)] + sigma * rng.standard_normal((n_err, sub.d))
        ref = np.concatenate([R.denoise(x[i : i + 1], y, sigma) for i in range(n_err)])
        for b, den in dens.items():
            worst[b] = max(worst[b], rel_err(den(torch.from_numpy(x), sigma).numpy(), ref))
        worst["naive_fp32"] = max(worst["naive_fp32"], rel_err(naive_fp32(torch.from_numpy(x).float(), Y, ysq, sigma, chunk).double().numpy(), ref))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=50_000)
    ap.add_argument("--d", type=int, default=3072)
    ap.add_argument("--N", type=int, nargs="+", default=[1, 8, 64, 512])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 20.0],
                    help="sigmas (model space [-1, 1]) of the timed cpu runs; baselines do not depend on sigma")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--err-sigmas", type=float, nargs="+", default=[1e-3, 0.1, 1.0, 20.0, 1e3])
    ap.add_argument("--err-rows", type=int, default=3000, help="rows of the data used for the error check")
    ap.add_argument("--matmul-n", type=int, default=4096)
    ap.add_argument("--bw-bytes", type=int, default=1 << 30)
    ap.add_argument("--skip", nargs="*", default=[], help="methods to leave out: naive_fp32 torch cpu")
    ap.add_argument("--csv", default=str(HERE / "bench_dense.csv"))
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="uint8", choices=["uint8", "float16", "bfloat16", "float32"],
                    help="storage of the rows: uint8, or the same images in model space [-1, 1] as floats "
                         "(the cpu backend's float64 path); bytes and bandwidth count the stored size")
    args = ap.parse_args(argv)
    if args.quick:
        args.M, args.d, args.N, args.repeats = 600, 75, [1, 5], 2
        args.err_sigmas, args.err_rows, args.matmul_n, args.bw_bytes = [1e-3, 1.0, 1e3], 300, 256, 1 << 22
        args.sigmas = [0.5, 20.0]

    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    print(f"# bench_dense: {machine()}; commit {commit()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"rows M = {args.M} x d = {args.d} {args.dtype}")
    fp32 = matmul_rate(torch.float32, args.matmul_n, 3)
    bf16 = matmul_rate(torch.bfloat16, args.matmul_n, 3)
    bw = read_bandwidth(args.bw_bytes, 5)
    print(f"# limits: fp32 matmul {fp32:.1f} GFLOP/s, bf16 matmul {bf16:.1f} GFLOP/s, read bandwidth {bw:.1f} GB/s")
    peaks = vector_peaks()
    int8 = peaks.get("int8_gmacs", float("nan"))
    if peaks:
        print(f"# vector-unit peaks (register-only loops, all threads): int8 vpdpbusd {int8:.0f} GMAC/s, "
              f"int16 vpdpwssd {peaks['int16_gmacs']:.0f} GMAC/s, fp64 FMA {peaks['fp64_gflops']:.0f} GFLOP/s")

    raw = rng.integers(0, 256, (args.M, args.d), dtype=np.uint8)
    if args.dtype != "uint8":  # the same images, model space, stored as floats
        raw = torch.from_numpy(raw.astype(np.float32) / 127.5 - 1.0).to(getattr(torch, args.dtype))
    ds = optden.Dataset.from_array(raw)
    nbytes = args.M * args.d * raw.element_size() if torch.is_tensor(raw) else raw.nbytes
    M, d = ds.M, ds.d
    chunk = max(1, (1 << 26) // (4 * d))  # 64 MB of fp32 rows per chunk
    Y = None
    if "naive_fp32" not in args.skip:
        Y = ds.model_rows(np.arange(M)).float()
        ysq = (Y * Y).sum(1)
    dens = {b: optden.OptimalDenoiser(ds, backend=b) for b in ("cpu", "torch") if b not in args.skip}

    err = errors(raw, args.err_sigmas, 3, min(args.err_rows, M), chunk, rng)
    # the read probe timed in every round: one read of the data's bytes (float32 ones, numpy-
    # allocated like the dataset's rows), so that "/ bandwidth, same rounds" compares each
    # pass with the memory speed of its own round (this VM's measured bandwidth moved from
    # 30 to 53 GB/s between runs)
    probe = torch.from_numpy(np.ones(nbytes // 4, dtype=np.float32))
    rows = []
    for n in args.N:
        idx = rng.integers(0, M, n)
        base = ds.model_rows(idx).numpy()
        runs = []
        if Y is not None:
            x = torch.from_numpy(base + args.sigmas[-1] * rng.standard_normal(base.shape))
            xf = x.float()
            runs.append(("naive_fp32", args.sigmas[-1], lambda xf=xf, s=args.sigmas[-1]: naive_fp32(xf, Y, ysq, s, chunk), "-"))
        if "torch" in dens:
            x = torch.from_numpy(base + args.sigmas[-1] * rng.standard_normal(base.shape))
            runs.append(("torch", args.sigmas[-1], lambda x=x, s=args.sigmas[-1]: dens["torch"](x, s), "-"))
        if "cpu" in dens:
            for s in args.sigmas:
                x = torch.from_numpy(base + s * rng.standard_normal(base.shape))
                ev = dens["cpu"].denoise_certified(x, s)
                modes = ",".join(f"{m}:{ev.mode.count(m)}" for m in sorted(set(ev.mode)))
                runs.append(("cpu", s, lambda x=x, s=s: dens["cpu"](x, s), modes))
        reps = args.repeats if n < 512 else max(2, args.repeats // 2)
        # the torch backend is timed in rounds of its own: its float64 copies of the blocks
        # (16 MB each, backed by huge pages) leave the kernel work that, in shared rounds,
        # slowed the run after it by up to 3x at N = 1
        apart = [j for j, r in enumerate(runs) if r[0] == "torch"]
        together = [j for j in range(len(runs)) if j not in apart]
        all_t = [None] * len(runs)
        t_read, *shared = interleaved_times([probe.sum] + [runs[j][2] for j in together], reps)
        for j, ts in zip(together, shared):
            all_t[j] = ts
        for j, ts in zip(apart, interleaved_times([runs[j][2] for j in apart], reps) if apart else []):
            all_t[j] = ts
        read_gbs = nbytes / statistics.median(t_read) / 1e9
        print(f"{'read':>10} N={n:<4} probe {statistics.median(t_read) * 1e3:9.1f} ms {read_gbs:6.2f} GB/s (same rounds)")
        for j, ((name, s, fn, modes), ts) in enumerate(zip(runs, all_t)):
            t, tmin = statistics.median(ts), min(ts)
            # median over rounds of (read probe time / this run's time), in the same round
            same = statistics.median([a / b for a, b in zip(t_read, ts)]) if j in together else float("nan")
            gflops = 4.0 * n * M * d / t / 1e9
            gbs = nbytes / t / 1e9
            rows.append({
                "method": name, "N": n, "M": M, "d": d, "dtype": args.dtype, "sigma": s, "time_s": t, "best_s": tmin, "GFLOP/s": gflops,
                "vs_fp32_peak": gflops / fp32, "vs_bf16_peak": gflops / bf16, "vs_int8_peak": gflops / 2 / int8,
                "GB/s": gbs, "vs_bandwidth": gbs / bw,
                "best_vs_fp32_peak": 4.0 * n * M * d / tmin / 1e9 / fp32, "best_vs_bandwidth": nbytes / tmin / 1e9 / bw,
                "vs_bandwidth_same_rounds": same, "read_GBs_same_rounds": read_gbs,
                "max_rel_err": err.get(name, float("nan")), "modes": modes,
            })
            r = rows[-1]
            print(f"{name:>10} N={n:<4} sigma={s:<6g} {t * 1e3:9.1f} ms (best {tmin * 1e3:.1f}) {gflops:8.1f} GFLOP/s "
                  f"({r['vs_fp32_peak']:.2f} fp32, {r['vs_bf16_peak']:.2f} bf16) {gbs:6.2f} GB/s ({r['vs_bandwidth']:.2f} bw, "
                  f"{same:.2f} same rounds) "
                  f"err {r['max_rel_err']:.1e} {modes}", flush=True)

    print()
    print("| method | N | sigma | median ms | best ms | GFLOP/s | / fp32 | / bf16 | / int8 | GB/s | / bandwidth | "
          "best / bandwidth | / bandwidth, same rounds | max rel err D* | speed-up vs naive (median, best) | "
          "vs torch (median, best) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = {m: next((q for q in rows if q["method"] == m and q["N"] == r["N"]), None) for m in ("naive_fp32", "torch")}
        sp = {m: (f"{q['time_s'] / r['time_s']:.2f}, {q['best_s'] / r['best_s']:.2f}" if q else "-") for m, q in ref.items()}
        print(f"| {r['method']} | {r['N']} | {r['sigma']:g} | {r['time_s'] * 1e3:.1f} | {r['best_s'] * 1e3:.1f} | "
              f"{r['GFLOP/s']:.1f} | {r['vs_fp32_peak']:.2f} | {r['vs_bf16_peak']:.2f} | {r['vs_int8_peak']:.2f} | "
              f"{r['GB/s']:.2f} | "
              f"{r['vs_bandwidth']:.2f} | {r['best_vs_bandwidth']:.2f} | "
              f"{'-' if r['vs_bandwidth_same_rounds'] != r['vs_bandwidth_same_rounds'] else format(r['vs_bandwidth_same_rounds'], '.2f')} | "
              f"{r['max_rel_err']:.1e} | {sp['naive_fp32']} | "
              f"{sp['torch']} |")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["fp32_GFLOPs", "bf16_GFLOPs", "int8_GMACs", "bandwidth_GBs"])
            w.writeheader()
            for r in rows:
                w.writerow({**r, "fp32_GFLOPs": fp32, "bf16_GFLOPs": bf16, "int8_GMACs": int8, "bandwidth_GBs": bw})
        print(f"# wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
