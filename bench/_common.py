"""What the benchmarks share: the machine line, the commit, timing, relative error.

Each bench/*.py script imports it as a sibling (``python bench/<script>.py`` puts bench/
on sys.path) and puts the checkout first on sys.path, so a script runs against this
tree's optden whether or not it is installed.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # the checkout, when optden is not installed
    sys.path.insert(0, str(ROOT))

__all__ = ["HERE", "ROOT", "machine", "commit", "times", "interleaved_times", "median_ms", "rel_err"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "?"


def machine() -> str:
    """One line: CPU model, CPUs, RAM, torch version and threads, and the GPU when CUDA has one."""
    try:
        mem = f", {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem = ""
    line = f"{_cpu_model()}, {os.cpu_count()} CPUs{mem}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


def commit() -> str:
    """The checkout's short commit hash ("?" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def times(fn, repeats: int) -> list[float]:
    """Wall seconds of ``repeats`` calls after one warm-up call (page faults, thread pools)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def interleaved_times(fns: list, repeats: int) -> list[list[float]]:
    """Seconds of each function, called in rounds (one call of each per round), so that a
    machine shared with other jobs loads every method alike. One warm-up round first."""
    out = [[] for _ in fns]
    for f in fns:
        f()
    for _ in range(repeats):
        for j, f in enumerate(fns):
            t0 = time.perf_counter()
            f()
            out[j].append(time.perf_counter() - t0)
    return out


def interleaved_runs(fns: list, rounds: int) -> tuple[list[float], list]:
    """Median seconds of each function over ``rounds`` rounds (one call of each per round,
    no warm-up: for runs of seconds on a shared machine, where one run alone can be off by
    1.5x), and each function's last result."""
    times = [[] for _ in fns]
    last = [None] * len(fns)
    for _ in range(max(1, int(rounds))):
        for j, f in enumerate(fns):
            t0 = time.perf_counter()
            last[j] = f()
            times[j].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times], last


def median_ms(fn, repeats: int = 3) -> float:
    """Median milliseconds of ``repeats`` calls on the host clock (no warm-up: for long runs)."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def rel_err(out, ref) -> float:
    """Largest relative error over rows: max_i ||out_i - ref_i|| / ||ref_i|| (any shapes (N, ...))."""
    if isinstance(out, torch.Tensor):
        out = out.detach().double().cpu().numpy()
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    out = np.asarray(out, dtype=np.float64).reshape(len(ref), -1)
    return float((np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())
