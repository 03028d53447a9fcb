"""Dense pass of the optimal denoiser on one GPU: optden's triton, cuda and torch backends
against the PyTorch code users write and a brute-force k-NN floor, with the device's
limits measured in the same run.

Shapes: N queries in {1, 8, 64, 512, 4096} at CIFAR-10 size (M = 50,000, d = 3072) and
ImageNet-64 size (M = 1,281,167, d = 12288), uint8 rows generated on the GPU (random
cluster centers plus small perturbations), resident in GPU memory. Queries are
``y_i + sigma * n`` in raw space. Rows of the table:

* ``optden-triton`` / ``optden-cuda`` / ``optden-torch64``: one coarse pass of the backend
  (``Backend.partial``: logits, online softmax, weighted sum, top-64, error bound);
* ``naive-fp32``: what users write: fp32 expansion logits for all rows (N x M), softmax,
  weighted sum, rows converted to fp32 in chunks;
* ``blocked-fp32``: a careful single pass: fp32 row blocks with an online softmax;
* ``knn-floor``: brute-force 1-NN of the same data (faiss-gpu IndexFlatL2 when present,
  else bf16 torch.matmul + topk, exact for uint8): the distance part alone.

Per row: median time (CUDA events; ``triton.testing.do_bench`` for runs under 0.1 s, with
about 0.2 s of repeats; else the median of 3 runs after one warm-up), TFLOP/s with FLOPs
= 4 N M d (2 N M d for the k-NN floor), GB/s for one read of the uint8 data (M d bytes),
and the ratios to the measured limits: the bf16 matmul rate (8192^3 torch.matmul) and
the copy bandwidth (1 GiB device-to-device copy, read + write bytes). Measurements whose
estimated time exceeds ``--budget`` seconds are listed as skipped with the estimate.
Prints a table and writes each row to the CSV as soon as it is measured (a run killed
by its time limit keeps what it measured). ``--device cpu`` runs the same plumbing on
CPU tensors with tiny sizes (``bench/gpu_check.sh --dry-run``); its numbers mean nothing.

    python bench/bench_gpu.py                          # both sizes, all N (long)
    python bench/bench_gpu.py --sizes cifar --n 1,64,4096 --csv bench/gpu.csv
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time

import torch

from _common import HERE, commit, machine, median_ms

SIZES = {"cifar": (50_000, 3072), "imagenet64": (1_281_167, 12288)}
# rough rates used only to skip measurements that would exceed the time budget (the cuda
# backend's dot loop runs on CUDA cores, ~3 TFLOP/s at d = 12288 by a read of the kernel)
_GUESS_FLOPS = {"optden-triton": 50e12, "optden-cuda": 3e12, "optden-torch64": 30e12,
                "naive-fp32": 30e12, "blocked-fp32": 30e12, "knn-floor": 200e12}


# ----------------------------------------------------------------------------- timing
def bench_ms(fn) -> float:
    """Median milliseconds of fn() on the current device (CUDA events; host clock on CPU).

    Runs under 0.1 s: ``triton.testing.do_bench`` with about 0.2 s of repeats. Longer
    runs: the first run is the warm-up, then the median of 3 (GPU time is scarce).
    """
    if not torch.cuda.is_available():
        return median_ms(fn)
    import triton.testing

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    if first < 100.0:
        return float(triton.testing.do_bench(fn, warmup=max(1, int(min(50, 3 * first))), rep=200,
                                             return_mode="median"))
    ts = []
    for _ in range(3):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        ts.append(start.elapsed_time(end))
    return statistics.median(ts)


def bf16_matmul_tflops(device: str) -> float:
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / (bench_ms(lambda: a @ b) * 1e-3) / 1e12


def copy_gbs(device: str) -> float:
    x = torch.randint(0, 256, (1 << (30 if device == "cuda" else 24),), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / (bench_ms(lambda: y.copy_(x)) * 1e-3) / 1e9


# ----------------------------------------------------------------------------- data
class DeviceRows:
    """Rows generated on the GPU, in the shape of ``optden.engine.rows.RowSource`` (resident).

    raw: (M, d) uint8 on the GPU; center (d,) float64 (integral); csq (M,) float64.
    """

    def __init__(self, raw: torch.Tensor, block_rows: int):
        self.dtype = "uint8"
        self.device = raw.device
        self.block_rows = block_rows
        self._raw = raw
        M, d = raw.shape
        colsum = torch.zeros(d, dtype=torch.float64, device=raw.device)
        for a in range(0, M, 1 << 16):
            colsum += raw[a:a + (1 << 16)].sum(0, dtype=torch.float64)
        self.center = torch.floor(colsum / M + 0.5)
        csq = [((raw[a:a + (1 << 16)].double() - self.center) ** 2).sum(1) for a in range(0, M, 1 << 16)]
        self._csq = torch.cat(csq)
        self.max_cnorm = float(self._csq.max().sqrt())

    @property
    def M(self) -> int:
        return self._raw.shape[0]

    @property
    def d(self) -> int:
        return self._raw.shape[1]

    def global_index(self, local):
        return local

    def resident_rows(self):
        return self._raw, self._csq

    def blocks(self, start=0, stop=None):
        stop = self.M if stop is None else stop
        for a in range(start, stop, self.block_rows):
            b = min(stop, a + self.block_rows)
            yield a, self._raw[a:b], self._csq[a:b]

    def gather(self, local):
        return self._raw[local.reshape(-1)]


def make_rows(M: int, d: int, seed: int = 0, device: str = "cuda") -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randint(0, 256, (4096, d), generator=g, device=device, dtype=torch.int16)
    out = torch.empty(M, d, dtype=torch.uint8, device=device)
    for a in range(0, M, 1 << 15):
        b = min(M, a + (1 << 15))
        lab = torch.randint(0, 4096, (b - a,), generator=g, device=device)
        noise = torch.randint(-8, 9, (b - a, d), generator=g, device=device, dtype=torch.int16)
        out[a:b] = (base[lab] + noise).clamp_(0, 255).to(torch.uint8)
    return out


# ----------------------------------------------------------------------------- baselines
def naive_fp32(raw: torch.Tensor, x: torch.Tensor, sigma: float, chunk: int) -> torch.Tensor:
    """What users write: all N x M fp32 logits by expansion, softmax, weighted sum. x: (N, d) fp32 raw space."""
    M = raw.shape[0]
    xsq = (x * x).sum(1, keepdim=True)
    logits = torch.empty(x.shape[0], M, dtype=torch.float32, device=x.device)
    for a in range(0, M, chunk):
        y = raw[a:a + chunk].float()
        logits[:, a:a + chunk] = -(xsq - 2 * x @ y.T + (y * y).sum(1)) / (2 * sigma**2)
    w = torch.softmax(logits, dim=1)
    out = torch.zeros_like(x)
    for a in range(0, M, chunk):
        out += w[:, a:a + chunk] @ raw[a:a + chunk].float()
    return out


def blocked_fp32(raw: torch.Tensor, x: torch.Tensor, sigma: float, chunk: int) -> torch.Tensor:
    """A careful single pass: fp32 row blocks with an online softmax."""
    from optden.engine.partial import Partial

    part = Partial.empty(x.shape[0], x.shape[1], 0, x.device, torch.float32)  # no top K
    xsq = (x * x).sum(1, keepdim=True)
    for a in range(0, raw.shape[0], chunk):
        y = raw[a:a + chunk].float()
        part.absorb(-(xsq - 2 * x @ y.T + (y * y).sum(1)) / (2 * sigma**2), y)
    return part.mean()


class KnnFloor:
    """Brute-force 1-NN of the rows, built once per data set: faiss-gpu IndexFlatL2 when it is
    installed and its fp32 copy of the rows fits the free GPU memory, else bf16 torch.matmul
    (exact for uint8 rows) + top-1 in row chunks."""

    def __init__(self, raw: torch.Tensor, chunk: int):
        self.raw, self.chunk = raw, chunk
        self.index = None
        self.name = "torch-bf16"
        try:
            import faiss

            fits = raw.is_cuda and raw.numel() * 4 < 0.6 * torch.cuda.mem_get_info(raw.device)[0]
            if faiss.get_num_gpus() > 0 and fits:
                self.res = faiss.StandardGpuResources()
                self.index = faiss.GpuIndexFlatL2(self.res, raw.shape[1])
                for a in range(0, raw.shape[0], chunk):
                    self.index.add(raw[a:a + chunk].float().cpu().numpy())
                self.name = "faiss-gpu"
        except ImportError:
            pass
        if self.index is None:
            self.ysq = torch.cat([(raw[a:a + chunk].float() ** 2).sum(1) for a in range(0, raw.shape[0], chunk)])

    def fn(self, x: torch.Tensor):
        """A callable running the 1-NN search of queries x (N, d) fp32."""
        if self.index is not None:
            xq = x.cpu().numpy()
            return lambda: self.index.search(xq, 1)
        xb = x.to(torch.bfloat16)
        raw, chunk, ysq = self.raw, self.chunk, self.ysq

        def run():
            best = torch.full((x.shape[0],), math.inf, device=x.device)
            for a in range(0, raw.shape[0], chunk):
                d2 = ysq[a:a + chunk] - 2 * (xb @ raw[a:a + chunk].to(torch.bfloat16).T).float()
                best = torch.minimum(best, d2.min(1).values)
            return best

        return run


# ----------------------------------------------------------------------------- main
def run_size(name: str, ns: list[int], args, limits: dict, emit):
    """Measure every method at one data-set size; ``emit(row)`` prints and records each row."""
    import optden.engine.backends  # noqa: F401  (registers triton / cuda)
    from optden.engine import dispatch

    M, d = SIZES[name]
    if args.max_rows:
        M = min(M, args.max_rows)
    print(f"\n== {name}: M = {M:,}, d = {d}, uint8 ({M * d / 1e9:.2f} GB resident) ==", flush=True)
    raw = make_rows(M, d, device=args.device)
    src = DeviceRows(raw, block_rows=max(1, (1 << 28) // (8 * d)))
    chunk = max(1024, (1 << 30) // (4 * d))  # fp32 rows per baseline chunk (1 GiB)
    sigma_raw = args.sigma * 127.5  # the model-space sigma in raw (0..255) units
    coef_val = 1.0 / (2 * sigma_raw**2)
    knn = KnnFloor(raw, chunk) if "knn-floor" in args.methods else None
    g = torch.Generator(device=raw.device).manual_seed(1)
    for n in ns:
        idx = torch.randint(0, M, (n,), generator=g, device=raw.device)
        x = raw[idx].float() + sigma_raw * torch.randn(n, d, generator=g, device=raw.device)
        v = x.double() - src.center
        coef = torch.full((n,), coef_val, dtype=torch.float64, device=raw.device)
        flops = 4.0 * n * M * d
        nbytes = float(M * d)
        methods = {}
        for b in ("triton", "cuda", "torch"):
            label = "optden-torch64" if b == "torch" else f"optden-{b}"
            why = dispatch.reasons(b, raw.device, "uint8", d)
            if why:
                methods[label] = ("unavailable: " + "; ".join(why), None)
            else:
                be = dispatch.get(b)
                methods[label] = (None, lambda be=be: be.partial(v, coef, src, 64))
        methods["naive-fp32"] = (None, lambda: naive_fp32(raw, x, sigma_raw, chunk))
        methods["blocked-fp32"] = (None, lambda: blocked_fp32(raw, x, sigma_raw, chunk))
        if raw.is_cuda and n * M * 4 > torch.cuda.mem_get_info(raw.device)[0] * 0.8:
            methods["naive-fp32"] = (f"needs {n * M * 4 / 1e9:.0f} GB of N x M logits", None)
        if knn is not None:
            methods["knn-floor"] = (None, knn.fn(x))
        for label, (why, fn) in methods.items():
            if label not in args.methods:
                continue
            f = flops / 2 if label == "knn-floor" else flops
            est = max(f / _GUESS_FLOPS[label], nbytes / (limits["copy_gbs"] * 1e9 / 2))
            row = {"size": name, "M": M, "d": d, "N": n, "method": label if label != "knn-floor" else f"knn-floor ({knn.name})"}
            if why is None and est > args.budget:
                why = f"skipped: estimated {est:.0f} s > --budget {args.budget:.0f} s"
            if why is not None:
                row.update(ms="", tflops="", gbs="", tflops_ratio="", gbs_ratio="", note=why)
            else:
                try:
                    ms = bench_ms(fn)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row.update(ms="", tflops="", gbs="", tflops_ratio="", gbs_ratio="", note="out of GPU memory")
                    emit(row)
                    continue
                tf = f / (ms * 1e-3) / 1e12
                gbs = nbytes / (ms * 1e-3) / 1e9
                row.update(ms=f"{ms:.3f}", tflops=f"{tf:.2f}", gbs=f"{gbs:.1f}",
                           tflops_ratio=f"{tf / limits['bf16_tflops']:.3f}", gbs_ratio=f"{gbs / limits['copy_gbs']:.3f}",
                           note="")
            emit(row)
    del raw, src, knn
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


HEADER = ["size", "M", "d", "N", "method", "ms", "tflops", "gbs", "tflops_ratio", "gbs_ratio", "note"]


def print_header():
    print(f"{'size':<11}{'N':>6}  {'method':<28}{'ms':>12}{'TFLOP/s':>10}{'GB/s':>9}{'/bf16':>8}{'/copy':>8}  note")


def print_row(r):
    print(f"{r['size']:<11}{r['N']:>6}  {r['method']:<28}{r['ms']:>12}{r['tflops']:>10}{r['gbs']:>9}"
          f"{r['tflops_ratio']:>8}{r['gbs_ratio']:>8}  {r['note']}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="cifar,imagenet64", help="comma list of: " + ", ".join(SIZES))
    p.add_argument("--n", default="1,8,64,512,4096", help="comma list of query batch sizes")
    p.add_argument("--sigma", type=float, default=0.5, help="model-space sigma of the queries (data in [-1, 1])")
    p.add_argument("--budget", type=float, default=60.0, help="skip a measurement estimated to take longer (seconds)")
    p.add_argument("--max-rows", type=int, default=0, help="cap M (quick runs)")
    p.add_argument("--methods", default="optden-triton,optden-cuda,optden-torch64,naive-fp32,blocked-fp32,knn-floor")
    p.add_argument("--csv", default=str(HERE / "bench_gpu.csv"), help="CSV output path")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: the plumbing on CPU tensors (dry run; use a small --max-rows)")
    args = p.parse_args(argv)
    args.methods = set(args.methods.split(","))
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run it on a GPU machine. Nothing was measured.", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        p.error(f"--sizes: unknown {bad}; choose from {list(SIZES)}")
    ns = [int(t) for t in args.n.split(",") if t.strip()]
    t0 = time.time()
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    limits = {"bf16_tflops": bf16_matmul_tflops(args.device), "copy_gbs": copy_gbs(args.device)}
    print(f"# bench_gpu: {machine()}; commit {commit()}; device {dev_name}")
    print(f"measured limits: bf16 matmul {limits['bf16_tflops']:.1f} TFLOP/s, device copy {limits['copy_gbs']:.0f} GB/s")
    print("FLOPs = 4 N M d per dense pass (2 N M d for the k-NN floor); GB/s = one read of the uint8 rows")
    print_header()
    extra = {"bf16_tflops_limit": f"{limits['bf16_tflops']:.1f}", "copy_gbs_limit": f"{limits['copy_gbs']:.0f}",
             "device": dev_name}
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HEADER + list(extra))
        w.writeheader()
        f.flush()

        def emit(row):
            print_row(row)
            w.writerow({**row, **extra})
            f.flush()  # a run killed by its time limit keeps every row it measured

        for s in sizes:
            run_size(s, ns, args, limits, emit)
    print(f"\nCSV: {args.csv}  ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
