"""Out-of-core dense pass: an ImageNet-64-shaped uint8 memmap streamed from disk.

Builds (or reuses) a memory-mapped .npy of ``--rows`` x 12288 uint8 rows (ImageNet 64x64:
1.28M rows, 15.7 GB; the default 100,000 rows is 1.2 GB), then times on this CPU:

* the floor: reading the file once (64 MiB ``preadv`` calls from 1 and 4 threads), cold
  (its pages dropped from the page cache with ``posix_fadvise(DONTNEED)``, which needs no
  root, after unmapping it) and warm; the floor is the faster cold read;
* one dense pass of the optimal denoiser for N = 64 queries at sigma = 1 (dense mode),
  cold and warm, for each backend asked for (``cpu``: optden._C, when built; ``torch``),
  both streaming through optden's prefetching row source under ``--memory-budget``.

Reported: seconds, GB/s of the file, GFLOP/s (4 N M d per pass), and floor/t, the ratio
of the floor (fastest cold read) to the time (1.0 = as fast as reading the file).
Progress bars show the file being built, read and streamed.

    python bench/bench_scale.py                 # 100,000 rows (1.2 GB), a few minutes
    python bench/bench_scale.py --rows 1281167  # full ImageNet-64 size (15.7 GB of disk)
    python bench/bench_scale.py --rows 5000     # a smoke run
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import HERE, commit, machine

import optden
from optden.engine.rows import parse_bytes

D_IMAGENET64 = 3 * 64 * 64


def build_file(path: Path, rows: int, d: int, seed: int = 0) -> None:
    """Write (rows, d) uint8 image-like rows (smooth per-row gradients plus noise) in chunks."""
    from tqdm import tqdm

    if path.exists():
        try:
            mm = np.load(path, mmap_mode="r")
            if mm.shape == (rows, d) and mm.dtype == np.uint8:
                print(f"reusing {path} ({path.stat().st_size / 1e9:.2f} GB)")
                return
        except ValueError:
            pass
    need = rows * d + 4096
    free = shutil.disk_usage(path.parent).free
    if need > 0.9 * free:
        sys.exit(f"not enough disk for {need / 1e9:.1f} GB at {path.parent} ({free / 1e9:.1f} GB free); use --rows")
    tmp = path.with_suffix(".tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, d))
    g = np.random.default_rng(seed)
    step = max(1, (64 << 20) // d)
    ramp = np.linspace(0.0, 1.0, d, dtype=np.float32)
    with tqdm(total=rows * d, unit="B", unit_scale=True, desc="build memmap") as bar:
        for a in range(0, rows, step):
            b = min(rows, a + step)
            lo = g.uniform(0, 128, (b - a, 1)).astype(np.float32)
            hi = g.uniform(64, 127, (b - a, 1)).astype(np.float32)
            noise = g.integers(0, 32, (b - a, d), dtype=np.uint8)
            mm[a:b] = (lo + hi * ramp[None, :]).astype(np.uint8) + noise
            bar.update((b - a) * d)
    mm.flush()
    del mm
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def drop_cache(path: Path) -> bool:
    """Evict the file's clean pages from the page cache (no root needed); False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def cached_fraction(path: Path) -> float | None:
    """Fraction of the file's pages resident in the page cache (mincore via fincore, if present)."""
    exe = shutil.which("fincore")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "RES", str(path)],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return int(out[0]) / path.stat().st_size
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def read_once(path: Path, threads: int = 1) -> float:
    """Seconds to read the whole file once: 64 MiB ``preadv`` calls from ``threads`` threads
    (each reads every threads-th chunk; several streams in flight is what storage needs to
    reach its bandwidth)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    chunk = 64 << 20
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        with tqdm(total=size, unit="B", unit_scale=True, desc=f"read file x{threads}", leave=False) as bar:
            def worker(i):
                buf = bytearray(chunk)
                for off in range(i * chunk, size, threads * chunk):
                    n = os.preadv(fd, [buf], off)
                    bar.update(n)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(worker, range(threads)))
            return time.perf_counter() - t0
    finally:
        os.close(fd)


def dense_pass(den, q: torch.Tensor, sigma: float, desc: str) -> tuple[float, list]:
    """Seconds of one certified evaluation (one dense pass), with a progress bar over rows."""
    from tqdm import tqdm

    src = den.source()
    bar = tqdm(total=den.M, unit="row", unit_scale=True, desc=desc, leave=False)
    orig_blocks, orig_load = src.blocks, src._load

    def blocks(*a, **kw):  # progress only: counts the rows the backend streams
        for off, raw, csq in orig_blocks(*a, **kw):
            yield off, raw, csq
            bar.update(raw.shape[0])

    def load(a, b):
        bar.update(b - a)
        return orig_load(a, b)

    src.blocks, src._load = blocks, load
    try:
        t0 = time.perf_counter()
        ev = den.denoise_certified(q, sigma)
        t = time.perf_counter() - t0
    finally:
        src.blocks, src._load = orig_blocks, orig_load
        bar.close()
    assert not torch.isnan(ev.denoised).any()
    return t, ev.mode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows of the memmap (ImageNet-64: 1281167)")
    p.add_argument("--d", type=int, default=D_IMAGENET64, help="values per row (default 12288 = 3x64x64)")
    p.add_argument("--n", type=int, default=64, help="queries per pass (default 64)")
    p.add_argument("--sigma", type=float, default=1.0, help="noise level of the queries (default 1)")
    p.add_argument("--path", default="/tmp/optden_bench_scale/data.npy", help="where the memmap is written")
    p.add_argument("--backends", default="cpu,torch", help="backends to time (default cpu,torch)")
    p.add_argument("--memory-budget", default="256M", help="rows held at once by the streamed pass (default 256M)")
    p.add_argument("--keep", action="store_true", help="keep the memmap file afterwards")
    p.add_argument("--csv", default=str(HERE / "scale.csv"), help="CSV output (git-ignored)")
    args = p.parse_args(argv)

    path = Path(args.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"disk free at {path.parent}: {shutil.disk_usage(path.parent).free / 1e9:.1f} GB; "
          f"file {args.rows} x {args.d} uint8 = {args.rows * args.d / 1e9:.2f} GB")
    build_file(path, args.rows, args.d)
    size = path.stat().st_size
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows_out = []

    def record(what, backend, state, seconds, note=""):
        flops = 4.0 * args.n * args.rows * args.d if what == "dense pass" else 0.0
        rows_out.append({
            "what": what, "backend": backend, "cache": state, "seconds": seconds, "GB/s": size / seconds / 1e9,
            "GFLOP/s": flops / seconds / 1e9 if flops else float("nan"), "note": note,
        })

    dropped = drop_cache(path)
    frac = cached_fraction(path)
    state = "cold" if dropped else "unknown"
    print(f"page cache: {'dropped with posix_fadvise' if dropped else 'cannot drop'}"
          + (f"; {100 * frac:.0f}% of the file resident" if frac is not None else ""))
    record("read file", "1 thread", state, read_once(path, 1))
    drop_cache(path)
    record("read file", "4 threads", state, read_once(path, 4))
    record("read file", "4 threads", "warm", read_once(path, 4))

    ds = optden.Dataset.from_npy(path)
    t0 = time.perf_counter()
    stats = ds._get_stats()  # the one-off statistics pass (two reads of the file)
    record("row statistics", "-", "mixed", time.perf_counter() - t0, "center + norms, 2 reads")

    def fresh_dataset():
        """Reopen the memmap (reusing the statistics): pages mapped by an earlier Dataset
        cannot be evicted by posix_fadvise, so a cold pass needs a fresh mapping."""
        d = optden.Dataset.from_npy(path)
        d._stats = stats
        return d
    g = torch.Generator().manual_seed(0)
    rows_idx = torch.randint(0, args.rows, (args.n,), generator=g)
    y = ds.model_rows(rows_idx.numpy())
    q = y + args.sigma * torch.randn(y.shape, generator=g, dtype=torch.float64)

    from optden.engine import dispatch
    from optden.denoiser import OptimalDenoiser
    import inspect

    extra = {"prune": "off"} if "prune" in inspect.signature(OptimalDenoiser.__init__).parameters else {}
    for label in [b.strip() for b in args.backends.split(",") if b.strip()]:
        name = label
        why = dispatch.reasons(name, torch.device("cpu"), "uint8", args.d)
        if why:
            print(f"backend {name}: skipped ({'; '.join(why)})")
            continue
        for st in ("cold", "warm"):
            if st == "cold":
                den = src = None
                ds = None
                gc.collect()  # unmap the file so that its pages can be dropped
                dropped = drop_cache(path)
                ds = fresh_dataset()
                den = OptimalDenoiser(ds, backend=name, **extra)
                src = den.source()
                src.memory_budget = parse_bytes(args.memory_budget)
            frac = cached_fraction(path)
            t, modes = dense_pass(den, q, args.sigma, f"{label} {st}")
            note = f"modes {sorted(set(modes))}"
            if frac is not None:
                note += f"; {100 * frac:.0f}% cached before"
            if src.stats.blocks:
                note += f"; prefetch peak {src.stats.peak_bytes / 2**20:.0f} MiB, waited {src.stats.wait_seconds:.1f} s"
            record("dense pass", label, st if st == "warm" or dropped else "as is", t, note)

    floor = min(r["seconds"] for r in rows_out if r["what"] == "read file" and r["cache"] == state)
    hdr = f"{'what':<16}{'backend':<14}{'cache':<7}{'seconds':>9}{'GB/s':>8}{'GFLOP/s':>9}{'floor/t':>9}  note"
    lines = [hdr, "-" * len(hdr)]
    for r in rows_out:
        r["floor_ratio"] = floor / r["seconds"]
        gf = "" if r["GFLOP/s"] != r["GFLOP/s"] else f"{r['GFLOP/s']:.1f}"
        lines.append(f"{r['what']:<16}{r['backend']:<14}{r['cache']:<7}{r['seconds']:>9.2f}{r['GB/s']:>8.2f}"
                     f"{gf:>9}{r['floor_ratio']:>9.3f}  {r['note']}")
    print()
    print(f"optden bench_scale  {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}")
    print(f"machine: {machine()}")
    print(f"data: {args.rows} x {args.d} uint8 memmap, {size / 1e9:.2f} GB ({'larger' if size > ram else 'smaller'} "
          f"than RAM {ram / 2**30:.0f} GiB); N = {args.n} queries, sigma = {args.sigma:g}; "
          f"memory budget {args.memory_budget}")
    print("\n".join(lines))
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        w.writeheader()
        w.writerows(rows_out)
    print(f"wrote {args.csv}")
    if not args.keep:
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
