"""Smoke checks for a first run on a GPU machine: each backend against the float64 oracle,
and a one-rank NCCL ShardedDenoiser against the single-process denoiser.

Part of ``bench/gpu_check.sh`` (the first evidence a GPU run gives, before the long test
suite). Every check prints one line ``SMOKE <check> <backend> ... ok|FAIL`` and the exit
status is the number of failed checks (capped at 100). ``--device cpu`` (the script's
dry run) runs the same plumbing with the CPU backends.

    python bench/gpu_smoke.py backends [--device cuda]
    python bench/gpu_smoke.py nccl [--device cuda]     # one rank; gloo on CPU
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import numpy as np
import torch
from _common import rel_err

#: The precision contract (tests/tolerances.py): relative error of D* and of log p.
DENOISE_RTOL = 1e-5
LOG_DENSITY_RTOL = 1e-6
SIGMAS = (1e-3, 2e-2, 0.3, 5.0, 1e3)


def _datasets(rng: np.random.Generator):
    """Real images (sklearn digits, uint8 (1797, 64)) and random rows of odd width in each storage dtype."""
    import optden
    from sklearn.datasets import load_digits

    digits = np.clip(np.round(load_digits().data * 255.0 / 16.0), 0, 255).astype(np.uint8)
    out = {"digits-u8": optden.Dataset.from_array(digits)}
    base = rng.integers(0, 256, (40, 3075))
    u8 = np.clip(base[rng.integers(0, 40, 2003)] + rng.integers(-5, 6, (2003, 3075)), 0, 255).astype(np.uint8)
    out["random-u8-3075"] = optden.Dataset.from_array(u8)
    for dt in ("float16", "float32"):
        out[f"random-{dt}-1027"] = optden.Dataset.from_array((rng.standard_normal((1501, 1027)) * 2).astype(dt))
    return out


def _queries(y: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Near a row, between two rows, and pure noise: (3, d) float64 model space."""
    i, j = rng.integers(0, len(y), 2)
    return np.stack([y[i] + sigma * rng.standard_normal(y.shape[1]), 0.5 * (y[i] + y[j]),
                     max(sigma, 1.0) * rng.standard_normal(y.shape[1])])


def check_backends(device: str, backends: list[str], seed: int) -> int:
    import optden
    from optden.engine import dispatch
    from optden import reference as R

    rng = np.random.default_rng(seed)
    fails = 0
    dev = torch.device(device)
    for name, ds in _datasets(rng).items():
        y = ds.model_rows(np.arange(ds.M)).numpy()
        for b in backends:
            why = dispatch.reasons(b, dev, ds.dtype, ds.d)
            if why:
                print(f"SMOKE backend {b:<7} {name:<18} unavailable: {'; '.join(why)}", flush=True)
                if dev.type == "cuda" and b in ("triton", "cuda"):
                    fails += 1  # on a GPU machine the GPU backends must run
                continue
            try:
                den = optden.OptimalDenoiser(ds, device=device, backend=b)
                worst, worst_ld, t0 = 0.0, 0.0, time.perf_counter()
                for sigma in SIGMAS:
                    x = _queries(y, sigma, rng)
                    ev = den.denoise_certified(torch.from_numpy(x).to(device), sigma)
                    worst = max(worst, rel_err(ev.denoised, R.denoise(x, y, sigma)))
                    lse_ref = R.log_density(x, y, sigma)
                    ld = den.log_density(torch.from_numpy(x).to(device), sigma).cpu().numpy()
                    worst_ld = max(worst_ld, float(np.max(np.abs(ld - lse_ref) / np.maximum(np.abs(lse_ref), 1.0))))
                    if not torch.isfinite(ev.denoised).all():
                        worst = math.inf
                ok = worst <= DENOISE_RTOL and worst_ld <= LOG_DENSITY_RTOL
                fails += not ok
                print(f"SMOKE backend {b:<7} {name:<18} D* rel {worst:.2e}  log p rel {worst_ld:.2e}  "
                      f"({time.perf_counter() - t0:.1f} s) {'ok' if ok else 'FAIL'}", flush=True)
            except Exception:  # report and go on: the other backends' evidence still counts
                fails += 1
                print(f"SMOKE backend {b:<7} {name:<18} FAIL (exception)", flush=True)
                traceback.print_exc()
    return fails


def check_nccl(device: str, seed: int) -> int:
    """One rank (world size 1) through torch.distributed: NCCL on CUDA, gloo on CPU."""
    import optden
    from optden import distributed as D
    from optden import reference as R
    from sklearn.datasets import load_digits

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    with __import__("socket").socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    rng = np.random.default_rng(seed)
    digits = np.clip(np.round(load_digits().data * 255.0 / 16.0), 0, 255).astype(np.uint8)
    fails = 0
    try:
        dev = D.init_distributed(device=device, timeout=60)
        backend = torch.distributed.get_backend()
        ds = optden.Dataset.from_array(digits)
        y = ds.model_rows(np.arange(ds.M)).numpy()
        sharded = D.ShardedDenoiser(ds, device=dev)
        single = optden.OptimalDenoiser(ds, device=dev, backend=sharded.local_backend.name)
        worst, worst_same = 0.0, 0.0
        for sigma in SIGMAS:
            x = torch.from_numpy(_queries(y, sigma, rng)).to(dev)
            a, b = sharded(x, sigma), single(x, sigma)
            worst = max(worst, rel_err(a, R.denoise(x.cpu().numpy(), y, sigma)))
            worst_same = max(worst_same, float((a - b).abs().max()))
        ok = worst <= DENOISE_RTOL
        fails += not ok
        print(f"SMOKE nccl    {backend:<7} one rank, {sharded.local_backend.name} backend: D* rel {worst:.2e}, "
              f"max |sharded - single| {worst_same:.1e} {'ok' if ok else 'FAIL'}", flush=True)
    except Exception:
        fails += 1
        print("SMOKE nccl FAIL (exception)", flush=True)
        traceback.print_exc()
    finally:
        D.shutdown()
    return fails


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("check", choices=["backends", "nccl"])
    p.add_argument("--device", default="cuda", help="cuda (the real run) or cpu (dry run)")
    p.add_argument("--backends", default=None, help="comma list (default: torch,triton,cuda on cuda; torch,cpu on cpu)")
    p.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(4), "little"))
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_smoke.py: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    print(f"gpu_smoke.py {args.check}: device {args.device}, seed {args.seed} (--seed to rerun these draws)", flush=True)
    if args.check == "backends":
        default = "torch,triton,cuda" if args.device.startswith("cuda") else "torch,cpu"
        fails = check_backends(args.device, (args.backends or default).split(","), args.seed)
    else:
        fails = check_nccl(args.device, args.seed)
    print(f"gpu_smoke.py {args.check}: {fails} failed", flush=True)
    return min(fails, 100)


if __name__ == "__main__":
    sys.exit(main())
