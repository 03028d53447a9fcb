"""The GEMM pass (``optden.engine.backends.gpu_gemm_pass``) against the fused Triton pass, blocked fp32
PyTorch and the k-NN floor on one GPU, with its correctness checked against float64 in the same run.

Cases: CIFAR-10 size (M = 50,000, d = 3072) N = 1, 8, 64, 512, 4096 and ImageNet-64 size
(M = 1,281,167, d = 12288, resident) N = 1, 64, uint8 rows generated on the GPU
(``bench_gpu.make_rows``), queries ``y_i + sigma n`` at model-space sigma 0.5; one more
CIFAR case at sigma 80 with 3 query pieces, where the weighted sum runs (its bound allows
DENSE at tol >= 1e-3; at tol 1e-6 certify still falls back). Rows of the table, per case:

* ``gemm-pass``: ``gemm_partial`` (pieces, logits kernel, tile merges, top-64, bound; a
  weighted sum only where the bound allows DENSE), the note says what it chose;
* ``gemm-kernel``: the logits kernel alone (the pass less its host work and top-k);
  ``gemm-split`` (the query pieces, one launch) and ``gemm-topk`` (the top 64 from the 64
  best row tiles): two more parts of the pass, and ``torch-topk`` (the top 64 of all M
  logits) for comparison; the ``gemm-pass`` note gives its host time per call;
* ``gemm-certified``: the pass and ``optden.engine.precision.certify`` (float64 re-score of the
  top 64, the float64 torch pass as fallback): the exact certified result;
* ``fused-pass``: the triton backend's fused pass (OPTDEN_TRITON_PASS=fused);
* ``blocked-fp32``: a careful single fp32 pass in PyTorch; ``knn-floor``: bf16
  torch.matmul + min (faiss-gpu when installed), the distance part alone;
* ``gemm-kernel[<config>]``: the logits kernel under the other configurations (tuning data;
  dropped first when the time budget runs short).

Correctness (``check`` rows): D* of the certified result against float64 direct
differences over every row (``optden.engine.precision.exact_pass``, from gaps) for up to 8 queries, its
relative error (contract 1e-5), and the largest |coarse - exact| / delta over the top 64
rows of every query (<= 1: the bound held). Times are medians (``bench_gpu.bench_ms``);
TFLOP/s counts 4 N M d, GB/s one read of the uint8 rows; the ratios are to the bf16
matmul rate and the device copy bandwidth measured at the start. Every row is printed
and written to the CSV as it is measured; a failure prints one ``FAIL`` line and the run
goes on. Exit status: the number of failures (capped at 100).

    python bench/bench_gpu_pass.py                     # H100: about 2 minutes
    python bench/bench_gpu_pass.py --device cpu        # the plumbing on CPU (TRITON_INTERPRET=1, tiny sizes)
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))  # the checkout, when optden is not installed

CASES = [("cifar", 1, 0.5), ("cifar", 8, 0.5), ("cifar", 64, 0.5), ("cifar", 512, 0.5), ("cifar", 4096, 0.5),
         ("cifar", 64, 80.0), ("imagenet64", 1, 0.5), ("imagenet64", 64, 0.5)]
#: From this sigma on, the bench forces 3 query pieces: the bound then allows the weighted sum.
WSUM_SIGMA = 50.0
#: Cases whose logits kernel is also timed under every other configuration (GPU only).
SWEEP = {("cifar", 8), ("cifar", 64), ("cifar", 512), ("imagenet64", 64)}
HEADER = ["size", "M", "d", "N", "sigma", "method", "ms", "tflops", "gbs", "tflops_ratio", "gbs_ratio", "note"]


class Run:
    """The CSV, the limits, the deadline and the failure count of one run."""

    def __init__(self, args, limits, writer, f):
        self.args, self.limits, self.writer, self.f = args, limits, writer, f
        self.t0 = time.time()
        self.failures = 0
        self.results = {}
        self.reserve = 0.0

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def emit(self, case, method, ms=None, note="", flops=None, nbytes=None):
        size, M, d, n, sigma = case
        row = dict(size=size, M=M, d=d, N=n, sigma=sigma, method=method, ms="", tflops="", gbs="", tflops_ratio="",
                   gbs_ratio="", note=note)
        if ms is not None:
            row["ms"] = f"{ms:.4f}"
            if flops:
                tf = flops / (ms * 1e-3) / 1e12
                row.update(tflops=f"{tf:.2f}", tflops_ratio=f"{tf / self.limits['bf16_tflops']:.3f}")
            if nbytes:
                gbs = nbytes / (ms * 1e-3) / 1e9
                row.update(gbs=f"{gbs:.1f}", gbs_ratio=f"{gbs / self.limits['copy_gbs']:.3f}")
            self.results[(size, n, sigma, method)] = ms
        print(f"{size:<11}{n:>6}{sigma:>6g}  {method:<24}{row['ms']:>11}{row['tflops']:>9}{row['gbs']:>9}"
              f"{row['tflops_ratio']:>7}{row['gbs_ratio']:>7}  {note}", flush=True)
        self.writer.writerow({**row, **self.limits_row})
        self.f.flush()

    def fail(self, case, method, exc):
        self.failures += 1
        print(f"FAIL {case[0]} N={case[3]} sigma={case[4]:g} {method}: {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(limit=4)
        self.emit(case, method, note=f"FAIL {type(exc).__name__}: {str(exc)[:200]}")


def _model_dc(dc, center):
    """Centered raw-space D* -> model space ([-1, 1]: raw / 127.5 - 1)."""
    return (dc + center) / 127.5 - 1.0


def host_ms(fn, dev, reps: int = 7) -> float:
    """Median host milliseconds of one call, the device idle at its start (Python, launches and
    the call's own syncs): when it is close to the device time, the call is host bound."""
    import statistics

    import torch

    ts = []
    for _ in range(reps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return statistics.median(ts)


def check_case(run, case, src, v, coef, part, cert, n_check, logits_delta):
    """D* of the certified result against float64 direct differences; coarse logits against exact
    within the bound of the logits alone (``logits_delta`` (N,), tighter than the reported delta)."""
    import torch
    from optden.engine.precision import exact_logits, exact_pass

    n, d = v.shape
    idx = torch.arange(min(n, n_check), device=v.device)
    exact, ref_sq, _ = exact_pass(v[idx], coef[idx], src, 1)  # logits relative to each query's nearest row
    lse_e, dc_e = exact.lse() - coef[idx] * ref_sq, exact.mean()
    ref = _model_dc(dc_e, src.center)
    got = _model_dc(cert.dc[idx], src.center)
    rel = float(((got - ref).norm(dim=1) / ref.norm(dim=1)).max())
    lse_rel = float(((cert.lse[idx] - lse_e).abs() / lse_e.abs().clamp(min=1.0)).max())
    use = 0.0
    for a in range(0, n, 64):  # every query's top 64 rows, re-scored exactly
        b = min(n, a + 64)
        k = part.top_idx.shape[1]
        rows = src.gather(part.top_idx[a:b]).reshape(b - a, k, d)
        ex = exact_logits(v[a:b], coef[a:b], rows, src.center)
        err = (part.top_val[a:b] - ex).abs() / logits_delta[a:b, None]
        use = max(use, float(err.max()))
    modes = torch.bincount(cert.mode.long(), minlength=3).tolist()
    ok = rel <= 1e-5 and lse_rel <= 1e-6 and use <= 1.0
    run.emit(case, "check", note=f"{'ok' if ok else 'FAIL'} D* rel {rel:.2e} (<= 1e-5), log-sum-exp rel {lse_rel:.2e}, "
                                 f"max |coarse - exact| / delta {use:.3f} (<= 1) over the top {part.top_idx.shape[1]}, "
                                 f"modes dense/rescored/exact {modes}, logits delta median {float(logits_delta.median()):.3g}")
    if not ok:
        run.failures += 1
        print(f"FAIL {case[0]} N={case[3]} sigma={case[4]:g} check: D* rel {rel:.2e}, lse rel {lse_rel:.2e}, "
              f"bound use {use:.3f}", flush=True)


def run_case(run, name, n, sigma, data, knn):
    import torch
    from bench_gpu import blocked_fp32
    from optden.engine import dispatch
    from optden.engine.backends.gpu_gemm_pass import gemm_partial, kernels, tile_topk
    from optden.engine.precision import certify

    import optden.engine.backends  # noqa: F401 (registers the triton backend)

    raw, src, chunk = data
    M, d = raw.shape
    case = (name, M, d, n, sigma)
    dev = raw.device
    g = torch.Generator(device=dev).manual_seed(n)
    idx = torch.randint(0, M, (n,), generator=g, device=dev)
    sigma_raw = sigma * 127.5
    x = raw[idx].float() + sigma_raw * torch.randn(n, d, generator=g, device=dev)
    v = x.double() - src.center
    coef = torch.full((n,), 1.0 / (2 * sigma_raw**2), dtype=torch.float64, device=dev)
    flops, nbytes = 4.0 * n * M * d, float(M * d)
    on_gpu = dev.type == "cuda"
    from bench_gpu import bench_ms

    # 1. the GEMM pass, its kernel, and the certified result
    info = {}
    force = 3 if sigma >= WSUM_SIGMA else None
    try:
        part = gemm_partial(v, coef, src, 64, pieces=force, info=info)
        ms = bench_ms(lambda: gemm_partial(v, coef, src, 64, pieces=force))
        host = host_ms(lambda: gemm_partial(v, coef, src, 64, pieces=force), dev)
        run.emit(case, "gemm-pass", ms, f"pieces {info['pieces']}, logits config {info['logits_config']}, "
                                        f"weighted sums {info['weighted_sums']}/{n}, host {host:.3f} ms per call",
                 flops, nbytes)
    except Exception as exc:  # noqa: BLE001 (report, go on)
        run.fail(case, "gemm-pass", exc)
        part = None
    K = kernels()
    if part is not None:
        from optden.engine.backends.gpu_gemm_pass import split_query_int8

        qp, sc = split_query_int8(v, info["pieces"])[:2]
        csq32 = src._csq.float()
        coef32 = coef.float()
        try:
            ms = bench_ms(lambda: K.gemm_logits(raw, qp, sc, csq32, coef32))
            run.emit(case, "gemm-kernel", ms, f"config {info['logits_config']}", flops, nbytes)
            lg, tmx, _ = K.gemm_logits(raw, qp, sc, csq32, coef32)
            bm = K.logits_tiles(M, n, info["pieces"], on_gpu)[0]
            c128 = 128.0 - src.center
            parts = {"gemm-split": (lambda: K.gemm_split(v, c128, info["pieces"]), "the query pieces, one launch"),
                     "gemm-topk": (lambda: tile_topk(lg, tmx, 64, bm), "top 64 from the 64 best row tiles"),
                     "torch-topk": (lambda: lg.topk(min(64, M), dim=1), "top 64 of all M logits (what tile_topk avoids)")}
            for label, (fn, note) in parts.items():
                run.emit(case, label, bench_ms(fn), note)
            del lg, tmx
        except Exception as exc:  # noqa: BLE001
            run.fail(case, "gemm-kernel", exc)
        precise = dispatch.get("torch")

        def certified():
            p = gemm_partial(v, coef, src, 64, pieces=force)
            return certify(p, v, coef, src, 1e-6, fallback=lambda vv, cc: precise.partial(vv, cc, src, 64))

        try:
            cert = certified()
            ms = bench_ms(certified)
            run.emit(case, "gemm-certified", ms, "pass + certify (tol 1e-6)", flops, nbytes)
            check_case(run, case, src, v, coef, part, cert, 8 if M < 200_000 else 2, info["logits_delta"])
        except Exception as exc:  # noqa: BLE001
            run.fail(case, "gemm-certified", exc)
        if on_gpu and (name, n) in SWEEP and sigma == 0.5 and run.left() > 45 + run.reserve:
            for cfg, spec in K.LOGITS_CONFIGS.items():
                if cfg == info["logits_config"] or spec[5] < info["pieces"]:
                    continue
                try:
                    K.gemm_logits(raw, qp, sc, csq32, coef32, config=cfg)  # compile outside the timing
                    ms = bench_ms(lambda cfg=cfg: K.gemm_logits(raw, qp, sc, csq32, coef32, config=cfg))
                    run.emit(case, f"gemm-kernel[{cfg}]", ms, f"BLOCK_M,N,D,warps,stages = {spec[:5]}", flops, nbytes)
                except Exception as exc:  # noqa: BLE001
                    run.fail(case, f"gemm-kernel[{cfg}]", exc)
    if sigma != 0.5:
        return  # the baselines do not depend on sigma
    # 2. baselines
    fused = dispatch.get("triton")
    methods = [("fused-pass", lambda: fused.partial(v, coef, src, 64)),
               ("blocked-fp32", lambda: blocked_fp32(raw, x, sigma_raw, chunk))]
    if knn is not None:
        methods.append((f"knn-floor ({knn.name})", knn.fn(x)))
    for label, fn in methods:
        if run.left() < 10:
            run.emit(case, label, note="skipped: the time budget is spent")
            continue
        old = os.environ.get("OPTDEN_TRITON_PASS")
        os.environ["OPTDEN_TRITON_PASS"] = "fused"
        try:
            fn()  # compile / warm up outside the timing
            ms = bench_ms(fn)
            f = flops / 2 if label.startswith("knn") else flops
            run.emit(case, label, ms, "", f, nbytes)
        except Exception as exc:  # noqa: BLE001
            run.fail(case, label, exc)
        finally:
            if old is None:
                os.environ.pop("OPTDEN_TRITON_PASS", None)
            else:
                os.environ["OPTDEN_TRITON_PASS"] = old


def targets(run):
    """One line per target of issue 19 (H100), from this run's rows."""
    r, lim = run.results, run.limits
    lines = []

    def get(size, n, method, sigma=0.5):
        return r.get((size, n, sigma, method))

    Mc, dc = run.shapes.get("cifar", (50_000, 3072))
    c64 = get("cifar", 64, "gemm-certified")
    if c64 is not None:
        lines.append(f"TARGET cifar N=64 certified pass <= 0.5 ms: {c64:.3f} ms -> {'met' if c64 <= 0.5 else 'missed'}")
    for n in (512, 4096):
        t = get("cifar", n, "gemm-pass")
        if t is not None:
            ratio = 4.0 * n * Mc * dc / (t * 1e-3) / 1e12 / lim["bf16_tflops"]
            lines.append(f"TARGET cifar N={n} >= 0.60 of bf16 matmul: pass {ratio:.2f} -> {'met' if ratio >= 0.6 else 'missed'}")
    for n in (1, 8):
        t = get("cifar", n, "gemm-pass")
        if t is not None:
            ratio = Mc * dc / (t * 1e-3) / 1e9 / lim["copy_gbs"]
            lines.append(f"TARGET cifar N={n} >= 0.80 of copy bandwidth: pass {ratio:.2f}, kernel "
                         f"{Mc * dc / (get('cifar', n, 'gemm-kernel') or math.inf) / 1e6 / lim['copy_gbs']:.2f} "
                         f"-> {'met' if ratio >= 0.8 else 'missed'}")
    for method in ("gemm-pass", "gemm-certified"):
        t = get("imagenet64", 64, method)
        if t is not None:
            lines.append(f"TARGET imagenet64 N=64 <= 6 ms: {method} {t:.2f} ms -> {'met' if t <= 6.0 else 'missed'}")
    for line in lines:
        print(line, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: the plumbing on CPU tensors in Triton's interpreter, tiny sizes")
    p.add_argument("--sizes", default="cifar,imagenet64")
    p.add_argument("--max-rows", type=int, default=0, help="cap M (default: 600 rows on cpu)")
    p.add_argument("--budget-s", type=float, default=150.0, help="optional work stops when this is near")
    p.add_argument("--csv", default=os.path.join(HERE, "bench_gpu_pass.csv"))
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
        args.max_rows = args.max_rows or 600
    import torch
    from bench_gpu import SIZES, DeviceRows, KnnFloor, bf16_matmul_tflops, copy_gbs, make_rows

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_pass.py: no CUDA device is visible; nothing was measured.", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        p.error(f"--sizes: unknown {bad}; choose from {list(SIZES)}")
    limits = {"bf16_tflops": bf16_matmul_tflops(args.device), "copy_gbs": copy_gbs(args.device)}
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (interpreter dry run)"
    print(f"device: {dev_name}  torch {torch.__version__}")
    print(f"measured limits: bf16 matmul {limits['bf16_tflops']:.1f} TFLOP/s, device copy {limits['copy_gbs']:.0f} GB/s")
    print("TFLOP/s: 4 N M d per pass; GB/s: one read of the uint8 rows")
    print(f"{'size':<11}{'N':>6}{'sigma':>6}  {'method':<24}{'ms':>11}{'TFLOP/s':>9}{'GB/s':>9}{'/bf16':>7}{'/copy':>7}  note")
    with open(args.csv, "w", newline="") as f:
        extra = {"bf16_tflops_limit": f"{limits['bf16_tflops']:.1f}", "copy_gbs_limit": f"{limits['copy_gbs']:.0f}",
                 "device": dev_name}
        writer = csv.DictWriter(f, fieldnames=HEADER + list(extra))
        writer.writeheader()
        run = Run(args, limits, writer, f)
        run.limits_row = extra
        run.shapes = {}
        done = set()
        for si, name in enumerate(sizes):
            run.reserve = 50.0 * (len(sizes) - 1 - si)  # seconds the later sizes need: no sweep eats them
            M, d = SIZES[name]
            if args.max_rows:
                M = min(M, args.max_rows)
            if args.device == "cpu":
                d = 96 if name == "cifar" else 160
            try:
                raw = make_rows(M, d, device=args.device)
                src = DeviceRows(raw, block_rows=max(1, (1 << 28) // (8 * d)))
                chunk = max(1024, (1 << 30) // (4 * d))
                knn = KnnFloor(raw, chunk)
            except Exception as exc:  # noqa: BLE001
                run.fail((name, M, d, 0, 0.0), "data", exc)
                continue
            run.shapes[name] = (M, d)
            print(f"\n== {name}: M = {M:,}, d = {d}, uint8 ({M * d / 1e9:.2f} GB resident) ==", flush=True)
            for cname, n, sigma in CASES:
                if args.device == "cpu":
                    n = min(n, 5)  # the interpreter is slow: N = 1 and 5 stand for every N
                if cname != name or (name, n, sigma) in done:
                    continue
                done.add((name, n, sigma))
                if run.left() < 15:
                    run.emit((name, M, d, n, sigma), "all", note="skipped: the time budget is spent")
                    continue
                try:
                    run_case(run, name, n, sigma, (raw, src, chunk), knn)
                except Exception as exc:  # noqa: BLE001
                    run.fail((name, M, d, n, sigma), "case", exc)
            del raw, src, knn
            if args.device == "cuda":
                torch.cuda.empty_cache()
        targets(run)
    print(f"\nCSV: {args.csv}  ({time.time() - run.t0:.0f} s, {run.failures} failure(s))")
    return min(run.failures, 100)


if __name__ == "__main__":
    sys.exit(main())
