"""What the exact re-score from gaps costs (issue 17): certify before and after, A/B in one process.

The old ``certify`` (main at ab4b9c1: direct-difference logits normalised by exp(l - lse),
EXACT bound 0) is loaded from git beside the new one; both certify the same coarse pass,
called alternately. Printed per case: the mode, medians of each, the ratio new / old, the
share of certify in a whole ``denoise_certified`` call, and each one's error against the
mpmath oracle (the old one's is what the fix is for).

    python bench/bench_certify.py            # about a minute on 2 cores
"""
from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import ROOT, commit, interleaved_times, machine

import optden  # noqa: E402
from optden.engine import dispatch, precision  # noqa: E402
from optden.engine.gaps import centered_query  # noqa: E402
from optden.engine.rows import RowSource  # noqa: E402
from optden.reference import mp as MP  # noqa: E402

OLD_COMMIT = "ab4b9c1"


def from_main(path: str, module: str, package: str, swap: dict | None = None):
    """The module at ``path`` as main had it, loaded from git into this tree's package
    (``swap``: modules it imports that stand in for this tree's while it loads)."""
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:{path}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    file = Path(tempfile.mkdtemp()) / Path(path).name
    file.write_text(src)
    spec = importlib.util.spec_from_file_location(module, file)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = package
    sys.modules[module] = mod  # dataclasses look their module up
    saved = {name: sys.modules.get(name) for name in swap or {}}
    sys.modules.update(swap or {})
    try:
        spec.loader.exec_module(mod)
    finally:
        for name, m in saved.items():
            sys.modules[name] = m
    return mod


def old_certify():
    """``certify`` as main had it."""
    return from_main("optden/engine/precision.py", "optden.engine.precision_main", "optden.engine").certify


def old_denoiser_class():
    """``OptimalDenoiser`` as main had it (no query residual, no final check), with main's
    ``precision`` module and this tree's passes: the A/B of what the denoiser adds around a pass."""
    old_precision = sys.modules.get("optden.engine.precision_main") or from_main(
        "optden/engine/precision.py", "optden.engine.precision_main", "optden.engine")
    return from_main("optden/denoiser.py", "optden.denoiser_main", "optden",
                     swap={"optden.engine.precision": old_precision}).OptimalDenoiser


def faces() -> np.ndarray:
    from skimage import data

    img = data.astronaut()
    rows = [img[i:i + 8, j:j + 8].transpose(2, 0, 1).reshape(-1) for i in range(0, 505, 12) for j in range(0, 505, 12)]
    return np.stack(rows)


def digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.clip(np.round(load_digits().data * 255.0 / 16.0), 0, 255).astype(np.uint8)


def cases():
    g = np.random.default_rng(0)
    dg = digits()
    fc = faces()
    y_d = optden.Dataset.from_array(dg).model_rows(np.arange(len(dg))).numpy()
    y_f = optden.Dataset.from_array(fc).model_rows(np.arange(len(fc))).numpy()
    vals, counts = np.unique(fc, axis=0, return_counts=True)
    flat = vals[np.argmax(counts)] * (2 / 255) - 1
    u = g.integers(0, 256, (20, 48), dtype=np.uint8)
    tied = np.concatenate([u, u])
    yield "digits, near rows, sigma 1e-3", dg, y_d[g.integers(0, len(dg), 16)] + 1e-3 * g.standard_normal((16, 64)), 1e-3
    yield "faces, near rows, sigma 1e-2", fc, y_f[g.integers(0, len(fc), 16)] + 1e-2 * g.standard_normal((16, 192)), 1e-2
    yield "faces, 135 copies of a flat patch, sigma 1e-3", fc, flat[None] + 1e-4 * g.standard_normal((4, 192)), 1e-3
    yield "tied rows, query 1e6 * ones, sigma 1", tied, np.full((4, 48), 1e6), 1.0
    yield "digits, midpoints of two rows, sigma 1e-3", dg, 0.5 * (y_d[:8] + y_d[8:16]), 1e-3


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    old = old_certify()
    print(f"# certify: old (main {OLD_COMMIT}) vs new, same coarse pass (torch backend, K = min(64, M)), medians of 15 "
          f"interleaved calls\n# {machine()}; commit {commit()}")
    print(f"{'case':<48} {'mode':>9} {'old ms':>8} {'new ms':>8} {'new/old':>8} {'share':>7} {'old err':>9} {'new err':>9}")
    for name, raw, x, sigma in cases():
        ds = optden.Dataset.from_array(raw)
        src = RowSource(ds, torch.device("cpu"), 4096)
        u = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
        q = centered_query(u, None, ds.offset, ds.scale, src.center)
        v = q.v
        coef = torch.full((len(x),), ds.scale**2 / (2 * sigma**2), dtype=torch.float64)
        p = dispatch.get("torch").partial(v, coef, src, min(64, ds.M))

        def fresh():  # certify may not change its input, but keep each call's copy its own
            return precision.Partial(*(t.clone() for t in (p.m, p.s, p.acc, p.top_val, p.top_idx, p.delta)))

        def run_old():
            return old(fresh(), v, coef, src, precision.DEFAULT_TOL)

        def run_new():
            return precision.certify(fresh(), v, coef, src, precision.DEFAULT_TOL, query=q)

        den = optden.OptimalDenoiser(ds, backend="torch")
        den.denoise_certified(u, sigma)  # its row source and norms, built once
        # the whole call interleaved with the two certify calls: the share is of one moment's load
        t_old, t_new, t_all = interleaved_times([run_old, run_new, lambda: den.denoise_certified(u, sigma)], 15)
        mo, mn = statistics.median(t_old), statistics.median(t_new)
        truth = MP.denoise(x, raw, sigma, scale=ds.scale, offset=ds.offset)
        errs = []
        for c in (run_old(), run_new()):
            d = ((c.dc + src.center) * ds.scale + ds.offset).numpy()
            errs.append(float((np.linalg.norm(d - truth, axis=1) / np.linalg.norm(truth, axis=1)).max()))
        mode = precision.MODE_NAMES[int(run_new().mode.max())]
        print(f"{name:<48} {mode:>9} {mo * 1e3:8.2f} {mn * 1e3:8.2f} {mn / mo:8.2f} "
              f"{mn / statistics.median(t_all):7.1%} {errs[0]:9.1e} {errs[1]:9.1e}")
    print("# share: the new certify's part of one whole denoise_certified call (coarse pass + certify)")
    # the plain call on the DENSE path, where most sampling steps go: what the query's
    # conversion error and the final check add around the pass
    old_cls = old_denoiser_class()
    ds = optden.Dataset.from_array(digits())
    y = ds.model_rows(np.arange(ds.M)).numpy()
    print(f"\n# den(x, 0.5) on digits (DENSE): denoiser of main {OLD_COMMIT} vs new, same engine, medians of 200 "
          "interleaved calls")
    print(f"{'N':>4} {'old us':>9} {'new us':>9} {'new/old':>8}")
    for n in (1, 4, 16, 64):
        x = torch.from_numpy(y[:n] + 0.05)
        a, b = old_cls(ds), optden.OptimalDenoiser(ds)
        t_old, t_new = interleaved_times([lambda: a(x, 0.5), lambda: b(x, 0.5)], 200)
        mo, mn = statistics.median(t_old), statistics.median(t_new)
        print(f"{n:>4} {mo * 1e6:9.1f} {mn * 1e6:9.1f} {mn / mo:8.3f}")


if __name__ == "__main__":
    sys.exit(main())
