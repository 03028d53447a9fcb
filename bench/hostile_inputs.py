"""Hostile inputs, as a demanding user of PyTorch or FAISS would try them (issue 17).

Runs every scenario below in a process of its own (so that a SIGBUS or SIGABRT is seen as
what it is) with a timeout (a hang), and prints one line per scenario and the counts:

    tried, clear errors, correct results, silent-wrong, crash, hang, lost work

A scenario expects either a clear error (an optden error, or ``optden CMD: error: ...`` and
no traceback from the CLI, whose message names the argument or file) or a correct result
(checked against the mpmath oracle, or against the state on disk: finished batches and
chunks kept, resumed runs equal to uninterrupted ones). The full-disk and read-only cases
mount small tmpfs file systems and need root; without it they are reported as skipped.

    python bench/hostile_inputs.py                   # everything (~5 minutes on 2 cores)
    python bench/hostile_inputs.py --only distributed --runs 30
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable

# ----------------------------------------------------------------------------- scenarios
# Each is Python code run in a fresh process with `optden`, `np`, `torch`, `MP` (the mpmath
# oracle), `TMP` (a scratch directory) and the helpers of PRELUDE; it must call one of
# correct(why) / wrong(why) / lost(why), or raise (an optden error = clear, anything else =
# unclear). `expect` says which outcome is right: "error" or "result".

PRELUDE = '''
import json, os, shutil, subprocess, sys, numpy as np, torch, optden
from pathlib import Path
from optden.reference import mp as MP
TMP = Path(sys.argv[1])
def report(kind, why=""):
    print("@@" + json.dumps({"kind": kind, "why": str(why)[:300]}), flush=True)
    sys.exit(0)
def correct(why=""): report("correct", why)
def wrong(why=""): report("silent_wrong", why)
def lost(why=""): report("lost_work", why)
def tied(m=20, d=48, seed=0):
    u = np.random.default_rng(seed).integers(0, 256, (m, d), dtype=np.uint8)
    raw = np.concatenate([u, u])
    return raw, optden.Dataset.from_array(raw)
def digits():
    from sklearn.datasets import load_digits
    return np.clip(np.round(load_digits().data * 255.0 / 16.0), 0, 255).astype(np.uint8)
def check_denoise(den, raw, x, sigma, **kw):
    ds = den.dataset
    ev = den.denoise_certified(torch.as_tensor(x), sigma, **kw)
    xs = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    truth = MP.denoise(xs, raw, sigma, scale=ds.scale, offset=ds.offset)
    y = ds.model_rows(np.arange(ds.M)).numpy()
    for n in range(len(xs)):
        spread = np.linalg.norm(y - truth[n], axis=1).max()
        err = np.linalg.norm(ev.denoised.numpy()[n] - truth[n])
        if not (err <= float(ev.bound[n]) * spread + 1e-12 * (spread + 1) and float(ev.bound[n]) <= den.tol):
            wrong(f"error {err:.3g}, bound {float(ev.bound[n]):.3g}")
    plain = den(torch.as_tensor(x), sigma, **kw)
    if not torch.allclose(plain.double().reshape(ev.denoised.shape), ev.denoised, rtol=1e-6, atol=1e-12):
        wrong("the plain call differs from the certified one")
    correct(f"within bound {float(ev.bound.max()):.2g}")
def cli(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "optden.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)
def cli_clear(p, cmd, code=None):
    if "Traceback" in p.stderr or not p.stderr.startswith(f"optden {cmd}: error: ") and f"\\noptden {cmd}: error: " not in p.stderr:
        raise RuntimeError(f"unclear CLI failure (status {p.returncode}): {p.stderr[-300:]}")
    if p.returncode == 0 or (code is not None and p.returncode != code):
        raise RuntimeError(f"status {p.returncode}")
    report("clear_error", p.stderr.strip().splitlines()[-1])
def mount(size, ro=False):
    if os.geteuid() != 0:
        report("skipped", "needs root to mount a tmpfs")
    mnt = Path(tempfile.mkdtemp(dir=TMP))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode:
        report("skipped", r.stderr.decode())
    import atexit
    atexit.register(lambda: subprocess.run(["umount", "-l", str(mnt)]))
    return mnt
def remount(mnt, opts):
    subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)
def pngs(n=120, size=16, seed=0):
    from PIL import Image
    d = TMP / f"png{seed}"
    d.mkdir(exist_ok=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return d
import tempfile
'''

S = {}  # name -> (expect, code)


def scenario(name: str, expect: str, code: str) -> None:
    S[name] = (expect, textwrap.dedent(code))


# --- item 1: huge logits, tied rows, far queries
scenario("repro: tied rows, x = 1e6, sigma 1", "result", "raw, ds = tied(); check_denoise(optden.OptimalDenoiser(ds), raw, np.full((1, 48), 1e6), 1.0)")
for be in ("cpu", "torch"):
    for far in ("1e16", "-1e100", "1e200"):
        scenario(f"far query {far} * ones ({be})", "result",
                 f"raw, ds = tied(); check_denoise(optden.OptimalDenoiser(ds, backend={be!r}), raw, np.full((2, 48), {far}), 1.0)")
for far in ("1e300", "1e307"):  # beyond what the compensated gaps can split, or beyond float64 in raw units
    scenario(f"far query {far} * ones", "error",
             f"raw, ds = tied(); optden.OptimalDenoiser(ds)(torch.full((1, 48), {far}, dtype=torch.float64), 1.0)")
for path in ("portable", "avx2", "avx512", "torch"):
    scenario(f"d = 70000, 4+4 copies, sigma 1e-3 ({path})", "result", f"""
        from optden.engine.backends.cpu import CpuBackend
        from optden import reference as R
        g = np.random.default_rng(1); u = g.integers(0, 256, (4, 70000), dtype=np.uint8)
        ds = optden.Dataset.from_array(np.concatenate([u, u])); y = ds.model_rows(np.arange(8)).numpy()
        den = optden.OptimalDenoiser(ds, backend="torch" if {path!r} == "torch" else "cpu")
        if {path!r} != "torch":
            if {path!r} not in optden._ext.C.build_info()["cpu"]["dense_paths"]: report("skipped", "no such path here")
            den.backend = CpuBackend(path={path!r})
        x = np.stack([g.standard_normal(70000), y[2] + 1e-3 * g.standard_normal(70000), 0.5 * (y[0] + y[1])])
        ev = den.denoise_certified(torch.from_numpy(x), 1e-3)
        if abs(float(ev.top_w.sum(1).max()) - 1) > 1e-14 or (ev.bound > den.tol).any(): wrong("weights / bound")
        near = R.nearest(x[:2], y, 1)[1][:, 0]
        if np.abs(ev.denoised.numpy()[:2] - y[near]).max() > 1e-15: wrong("not the nearest rows")
        if np.abs(ev.denoised.numpy()[2] - R.denoise(x[2:], y, 1e-3)[0]).max() > 1e-8: wrong("midpoint")
        correct("copies share their weight exactly")""")
# --- item 2: tiny sigma
for x0, s in (("0.0", "1e-154"), ("1e6", "1e-150"), ("0.3", "1e-120"), ("-1e16", "1e-100")):
    scenario(f"digits, x = {x0}, sigma = {s}", "result", f"""
        raw = digits(); den = optden.OptimalDenoiser(optden.Dataset.from_array(raw))
        check_denoise(den, raw, np.full((1, 64), {x0}), {s})""")
scenario("sigma = 1e-170 (1/(2 sigma^2) overflows)", "error",
         "den = optden.OptimalDenoiser(optden.Dataset.from_array(digits())); den(torch.zeros(1, 64), 1e-170)")
scenario("query exactly at a row, sigma 1e-150: log density", "result", """
    g = np.random.default_rng(0); raw = (g.standard_normal((5, 9))).astype(np.float32)
    ds = optden.Dataset.from_array(raw); den = optden.OptimalDenoiser(ds)
    x = raw[2:3].astype(np.float64)
    ld = float(den.log_density(torch.from_numpy(x), 1e-150)[0]); t = float(MP.log_density(x, raw, 1e-150)[0])
    correct(ld) if abs(ld - t) <= 1e-6 * max(1, abs(t)) else wrong((ld, t))""")
scenario("per-sample sigma 1e-3 .. 1e3, bfloat16 rows", "result", """
    g = np.random.default_rng(2); rows = torch.from_numpy(g.standard_normal((30, 12))).to(torch.bfloat16)
    ds = optden.Dataset.from_array(rows); raw = rows.double().numpy(); den = optden.OptimalDenoiser(ds)
    x = g.standard_normal((4, 12)); check_denoise(den, raw, x, torch.tensor([1e-3, 0.1, 10.0, 1e3]))""")
scenario("float16 rows, strided float32 queries", "result", """
    g = np.random.default_rng(3); rows = (g.standard_normal((25, 7)) * 30).astype(np.float16)
    ds = optden.Dataset.from_array(rows); den = optden.OptimalDenoiser(ds)
    wide = torch.from_numpy(g.standard_normal((3, 14)) * 30).float(); x = wide[:, ::2]
    check_denoise(den, rows.astype(np.float64), x, 0.05)""")
scenario("nearest of a far query (-1e50)", "result", """
    raw, ds = tied(); den = optden.OptimalDenoiser(ds); x = np.full((1, 48), -1e50)
    d, i = den.nearest(torch.from_numpy(x), k=2); td, ti = MP.nearest(x, raw, 2, scale=ds.scale, offset=ds.offset)
    correct() if np.allclose(d.numpy(), td, rtol=1e-12) else wrong((d, td))""")
scenario("posterior at sigma 1e-3 between two rows", "result", """
    raw = digits()[:200]; ds = optden.Dataset.from_array(raw); den = optden.OptimalDenoiser(ds)
    y = ds.model_rows(np.arange(200)).numpy(); x = 0.5 * (y[3:4] + y[7:8])
    w, i = den.posterior(torch.from_numpy(x), 1e-3, k=3); wt = MP.weights(x, raw, 1e-3, scale=ds.scale, offset=ds.offset)
    correct() if np.abs(w.numpy() - np.take_along_axis(wt, i.numpy(), 1)).max() <= 1e-6 else wrong((w, wt.max()))""")
scenario("sigma = inf (a noise level since issue 18: the rows' mean)", "result", """
    raw = digits()[:200]; ds = optden.Dataset.from_array(raw); den = optden.OptimalDenoiser(ds)
    x = torch.zeros(2, 64, dtype=torch.float64); mean = ds.model_rows(np.arange(200)).mean(0)
    ev = den.denoise_certified(x, float('inf'))
    correct() if torch.allclose(ev.denoised, mean.expand(2, -1), rtol=1e-12, atol=1e-15) else wrong(ev.denoised)""")
# --- argument errors
for label, call in (("sigma 0", "den(x, 0.0)"), ("sigma -1", "den(x, -1.0)"), ("sigma nan", "den(x, float('nan'))"),
                    ("sigma wrong shape", "den(x, torch.ones(5))"),
                    ("sigma True", "den(x, True)"), ("sigma string", "den(x, '0.5')"),
                    ("x NaN", "x[0, 0] = float('nan'); den(x, 0.5)"), ("x wrong d", "den(torch.zeros(2, 65), 0.5)"),
                    ("x empty", "den(torch.zeros(0, 64), 0.5)"), ("x complex", "den(x.to(torch.complex64), 0.5)"),
                    ("x strings", "den(np.array([['a'] * 64]), 0.5)"), ("x float16 overflow", "den(torch.full((1, 64), 1e6).half(), 0.5)"),
                    ("posterior k = 0", "den.posterior(x, 0.5, k=0)"), ("nearest k > M", "den.nearest(x, k=10**6)"),
                    ("labels on an unlabelled set", "den(x, 0.5, class_labels=torch.tensor([1, 2]))"),
                    ("tol = 2", "optden.OptimalDenoiser(den.dataset, tol=2.0)"),
                    ("device cuda without CUDA", "torch.cuda.is_available() and report('skipped', 'has CUDA'); "
                                                 "optden.OptimalDenoiser(den.dataset, device='cuda')"),
                    ("device 'gpu'", "optden.OptimalDenoiser(den.dataset, device='gpu')"),
                    ("scale = 1e200", "optden.Dataset.from_array(np.ones((3, 4), np.float32), scale=1e200)"),
                    ("scale = 0", "optden.Dataset.from_array(np.ones((3, 4), np.float32), scale=0.0)")):
    scenario(f"argument: {label}", "error", f"""
        den = optden.OptimalDenoiser(optden.Dataset.from_array(digits()[:50])); x = torch.zeros(2, 64, dtype=torch.float64)
        {call}""")
# --- item 9: a user's model
for kind, body in (("NaN", "o = o.clone(); o[0, 0, 0, 0] = float('nan')"), ("inf", "o = o.clone(); o[-1] = float('inf')"),
                   ("(B, d) for (B, 1, 8, 8)", "o = o.reshape(o.shape[0], -1)"),
                   ("NHWC layout", "o = o.permute(0, 2, 3, 1).contiguous()"), ("None", "o = None"),
                   ("a tuple", "o = (o, s)"), ("integers", "o = o.round().long()")):
    for where in ("sample", "mean_shift", "score_deviation"):
        scenario(f"model returns {kind} ({where})", "error", f"""
            from optden.sampling import sample; from optden.meanshift import mean_shift; from optden.deviation import score_deviation
            den = optden.OptimalDenoiser(optden.Dataset.from_array(digits()[:100], image_shape=(1, 8, 8)))
            calls = [0]
            def model(x, s, labels=None):
                calls[0] += 1; o = den(x, s)
                if calls[0] >= 2:
                    {body}
                return o
            if {where!r} == "sample": sample(model, n=3, steps=4, shape=(1, 8, 8), progress=False)
            elif {where!r} == "mean_shift": mean_shift(model, torch.randn(3, 1, 8, 8, dtype=torch.float64), 0.3, max_iter=5, progress=False)
            else: score_deviation(model, den, n=3, steps=4)
            wrong("no error")""")
# --- items 4, 5: dataset files
for label, change in (("truncated", "open(p, 'r+b').truncate(4096)"), ("np.save over it", "np.save(p, np.load(p)[::-1].copy())"),
                      ("cp over it", "np.save(TMP / 'o.npy', 255 - np.load(p)); shutil.copyfile(TMP / 'o.npy', p)"),
                      ("rewritten in place", "f = open(p, 'r+b'); f.seek(300); f.write(bytes(500)); f.close()"),
                      ("replaced by rename", "np.save(TMP / 'o.npy', np.load(p)); os.replace(TMP / 'o.npy', p)")):
    scenario(f"data.npy {label} under a denoiser", "error", f"""
        optden.Dataset.from_array(digits()).save(TMP / "ds"); ds = optden.Dataset.load(TMP / "ds")
        den = optden.OptimalDenoiser(ds); x = torch.zeros(2, 64, dtype=torch.float64); a = den(x, 0.5)
        p = TMP / "ds" / "data.npy"; {change}
        b = den(x, 0.5); wrong("no error" + (" (and a different result)" if not torch.equal(a, b) else ""))""")
for field, value in (("scale", "0.01"), ("offset", "-0.5"), ("num_classes", "None"), ("num_classes", "12")):
    scenario(f"meta.json: {field} edited", "error", f"""
        optden.Dataset.from_array(digits(), labels=np.arange(1797) % 10).save(TMP / "ds")
        m = json.loads((TMP / "ds" / "meta.json").read_text()); m[{field!r}] = {value}
        (TMP / "ds" / "meta.json").write_text(json.dumps(m)); optden.Dataset.load(TMP / "ds", verify=False)
        wrong("loaded")""")
scenario("meta.json edited: dataset info --verify", "error", """
    optden.Dataset.from_array(digits()).save(TMP / "ds")
    m = json.loads((TMP / "ds" / "meta.json").read_text()); m["scale"] = 0.5; (TMP / "ds" / "meta.json").write_text(json.dumps(m))
    cli_clear(cli("dataset", "info", TMP / "ds", "--verify"), "dataset")""")
scenario("format version 1 dataset still loads, re-save upgrades it", "result", """
    import warnings
    optden.Dataset.from_array(digits()).save(TMP / "ds"); m = json.loads((TMP / "ds" / "meta.json").read_text())
    m["version"] = 1; del m["meta_sha256"]; (TMP / "ds" / "meta.json").write_text(json.dumps(m))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always"); ds = optden.Dataset.load(TMP / "ds")
    ds.save(TMP / "ds"); v = json.loads((TMP / "ds" / "meta.json").read_text())["version"]
    correct() if w and "Re-save" in str(w[0].message) and v == 2 else wrong((w, v))""")
scenario("dataset.json that is a list", "error", """
    d = pngs(4); (d / "dataset.json").write_text(json.dumps([["0000.png", 1]])); optden.Dataset.from_images(d); wrong("loaded")""")
scenario("stale data.npy.tmp-* of a killed save is removed", "result", """
    d = TMP / "ds"; d.mkdir(); dead = subprocess.Popen([sys.executable, "-c", "pass"]); dead.wait()
    (d / f"data.npy.tmp-{dead.pid}-0badc0de").write_bytes(bytes(1000)); optden.Dataset.from_array(digits()).save(d)
    correct() if not list(d.glob("*.tmp-*")) else wrong(list(d.glob("*.tmp-*")))""")
# --- items 3, 6, 7, 10: jobs and builds
scenario("full disk: sample --out on a 1.2 MB tmpfs", "error", """
    mnt = mount("1200k"); p = cli("sample", "demo:digits", "--n", 900, "--batch-size", 150, "--steps", 2, "--out", mnt / "job")
    if p.returncode < 0: report("crash", f"signal {-p.returncode}")
    if not list((mnt / "job").glob("batch_*.npz")): lost("no batch kept")
    cli_clear(p, "sample", 1)""")
scenario("full disk: resume after freeing space equals a run elsewhere", "result", """
    mnt = mount("1200k"); args = ["sample", "demo:digits", "--n", 900, "--batch-size", 150, "--steps", 2]
    p = cli(*args, "--out", mnt / "job"); kept = sorted(x.name for x in (mnt / "job").glob("batch_*.npz"))
    remount(mnt, "size=16m"); p2 = cli(*args, "--out", mnt / "job"); ref = cli(*args, "--out", TMP / "ref")
    if p2.returncode or ref.returncode: wrong(p2.stderr[-300:])
    if f"skipping {len(kept)} finished" not in p2.stdout: lost(p2.stdout[-300:])
    correct() if np.array_equal(np.load(mnt / "job" / "samples.npy"), np.load(TMP / "ref" / "samples.npy")) else wrong("differs")""")
scenario("full disk: dataset build on a 200 kB tmpfs", "error", """
    src = pngs(160); mnt = mount("200k"); p = cli("dataset", "build", src, mnt / "ds", "--chunk-size", 32)
    if p.returncode < 0: report("crash", f"signal {-p.returncode}")
    if not list((mnt / "ds" / ".build").glob("chunk_*.npy")): lost("no chunk kept")
    cli_clear(p, "dataset", 1)""")
scenario("full disk: index on a 300 kB tmpfs", "error", """
    mnt = mount("300k"); optden.Dataset.from_array(digits()[:1000]).save(mnt / "ds")
    cli_clear(cli("index", mnt / "ds", "--kind", "flat"), "index", 1)""")
for cmd, size in (("demo", "300k"), ("meanshift", "8k"), ("deviation", "40k")):
    scenario(f"full disk: {cmd} on a {size} tmpfs", "error", f"""
        optden.Dataset.from_array(digits()[:300]).save(TMP / "ds"); mnt = mount({size!r})
        args = {{"demo": ["demo", "--quick", "--max-rows", 300, "--out", mnt / "o"],
                "meanshift": ["meanshift", TMP / "ds", "--n", 200, "--out", mnt / "o"],
                "deviation": ["deviation", TMP / "ds", "--n", 64, "--out", mnt / "o"]}}[{cmd!r}]
        p = cli(*args)
        if p.returncode < 0: report("crash", f"signal {{-p.returncode}}")
        if p.returncode == 0: report("skipped", "it fitted: make the disk smaller")
        cli_clear(p, {cmd!r}, 1)""")
for cmd in ("demo", "sample", "meanshift", "deviation", "index", "dataset build"):
    scenario(f"read-only disk: {cmd}", "error", f"""
        optden.Dataset.from_array(digits()[:150]).save(TMP / "ds"); mnt = mount("1m")
        optden.Dataset.from_array(digits()[:150]).save(mnt / "ds"); src = pngs(8); remount(mnt, "ro")
        args = {{"demo": ["demo", "--quick", "--max-rows", 150, "--out", mnt / "o"],
                "sample": ["sample", "demo:digits", "--n", 2, "--steps", 2, "--out", mnt / "o"],
                "meanshift": ["meanshift", TMP / "ds", "--n", 2, "--out", mnt / "o"],
                "deviation": ["deviation", TMP / "ds", "--n", 2, "--out", mnt / "o"],
                "index": ["index", mnt / "ds", "--kind", "flat"],
                "dataset build": ["dataset", "build", src, mnt / "o"]}}[{cmd!r}]
        cli_clear(cli(*args), {cmd.split()[0]!r}, 1)""")
scenario("sample --out is a file", "error", """
    (TMP / "f").write_text("x"); cli_clear(cli("sample", "demo:digits", "--n", 2, "--steps", 2, "--out", TMP / "f"), "sample")""")
scenario("sample --memory-budget inf", "error", """
    cli_clear(cli("sample", "demo:digits", "--n", 2, "--steps", 2, "--memory-budget", "inf", "--out", TMP / "j"), "sample")""")
scenario("seven concurrent sample runs on one directory", "result", """
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "optden.cli", "sample", "demo:digits", "--n", 48, "--batch-size", 8, "--steps", 3, "--out", TMP / "job"]
    ps = [subprocess.Popen(list(map(str, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(7)]
    outs = [p.communicate(timeout=600) for p in ps]
    for p, (o, e) in zip(ps, outs):
        if p.returncode < 0: report("crash", f"signal {-p.returncode}")
        if "Traceback" in e or p.returncode not in (0, 2) or (p.returncode == 2 and "in use by another run" not in e):
            raise RuntimeError(f"status {p.returncode}: {e[-300:]}")
    ok = np.load(TMP / "job" / "samples.npy").shape == (48, 1, 8, 8)
    correct(f"statuses {sorted(p.returncode for p in ps)}") if ok else lost("no samples.npy")""")
scenario("dataset build killed between the save and its marker, resumed", "result", """
    import optden.data.ingest as ing
    src = pngs(100); real = optden.Dataset.save
    class Killed(BaseException): pass
    def die(self, d): real(self, d); raise Killed
    optden.Dataset.save = die
    try: ing.build_dataset(src, TMP / "ds", chunk_size=32, progress=False)
    except Killed: pass
    optden.Dataset.save = real
    ds, rep = ing.build_dataset(src, TMP / "ds", chunk_size=32, progress=False)
    ref, _ = ing.build_dataset(src, TMP / "ref", chunk_size=32, progress=False)
    correct() if np.array_equal(np.asarray(ds.raw), np.asarray(ref.raw)) else wrong("differs")""")
scenario("bit-flipped finished batch is recomputed", "result", """
    from optden.jobs import run_sample_job
    den = optden.OptimalDenoiser(optden.Dataset.demo("digits", max_rows=200))
    ref = run_sample_job(den, TMP / "j", n=6, batch_size=3, steps=3); p = TMP / "j" / "batch_000001.npz"
    b = bytearray(p.read_bytes()); b[len(b) // 2] ^= 4; p.write_bytes(bytes(b))
    res = run_sample_job(den, TMP / "j", n=6, batch_size=3, steps=3)
    correct() if res.computed == [1] and torch.equal(res.samples, ref.samples) else wrong((res.computed,))""")
scenario("resumed build whose source image changed", "result", """
    import optden.data.ingest as ing
    from PIL import Image
    src = pngs(96); real = ing.atomic_write_npy; n = [0]
    class Killed(BaseException): pass
    def die(p, *a):
        if Path(p).name.startswith("chunk_"):
            n[0] += 1
            if n[0] == 2: raise Killed
        return real(p, *a)
    ing.atomic_write_npy = die
    try: ing.build_dataset(src, TMP / "ds", chunk_size=32, progress=False, workers=1)
    except Killed: pass
    ing.atomic_write_npy = real
    Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(src / "0003.png")
    ds, rep = ing.build_dataset(src, TMP / "ds", chunk_size=32, progress=False)
    correct() if int(np.asarray(ds.raw[3]).max()) == 9 and rep.chunks_skipped == 0 else wrong(rep)""")


# ----------------------------------------------------------------------------- runner


def run_one(name: str, workdir: Path, timeout: float) -> dict:
    expect, code = S[name]
    tmp = Path(tempfile.mkdtemp(dir=workdir))
    src = PRELUDE + "\n" + code
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.monotonic()
    try:
        p = subprocess.run([PY, "-c", src, str(tmp)], capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=tmp)
    except subprocess.TimeoutExpired:
        return {"name": name, "expect": expect, "outcome": "hang", "why": f"over {timeout:.0f} s"}
    finally:
        subprocess.run(["umount", "-l", *map(str, tmp.glob("tmp*"))], capture_output=True) if os.geteuid() == 0 else None
        shutil.rmtree(tmp, ignore_errors=True)
    secs = time.monotonic() - t0
    marks = [line for line in p.stdout.splitlines() if line.startswith("@@")]
    if p.returncode < 0:
        return {"name": name, "expect": expect, "outcome": "crash", "why": f"signal {-p.returncode}", "s": secs}
    if marks:
        r = json.loads(marks[-1][2:])
        kind = r["kind"]
    elif p.returncode != 0:
        last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "?"
        kind = "clear_error" if _optden_error(last) else "unclear_error"
        r = {"why": last}
    else:
        kind, r = "unclear_error", {"why": "no outcome reported"}
    if kind == "clear_error" and expect == "result":
        kind = "unexpected_error"
    if kind == "correct" and expect == "error":
        kind = "silent_wrong"
    return {"name": name, "expect": expect, "outcome": kind, "why": r.get("why", ""), "s": secs}


def _optden_error(line: str) -> bool:
    """The child's last stderr line: ``optden.errors.X: arg: ...`` (or a subclass)."""
    names = ("InputError", "DtypeError", "DatasetError", "DatasetNotFoundError", "ChecksumError", "PrecisionError",
             "BackendUnavailableError", "DiskFullError", "JobMismatchError", "DistributedError")
    head, _, msg = line.partition(": ")
    return head.split(".")[-1] in names and ":" in msg


def distributed_runs(runs: int, workdir: Path) -> list[dict]:
    """`optden sample --distributed` as two processes; rank 1 SIGKILLed after the first
    batch. Rank 0 must exit 1 with the error every time."""
    out = []
    for it in range(runs):
        tmp = Path(tempfile.mkdtemp(dir=workdir))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for rank in (0, 1):
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
            procs.append(subprocess.Popen([PY, "-m", "optden.cli", "sample", "demo:digits", "--distributed", "--n", "400",
                                           "--batch-size", "4", "--steps", "6", "--timeout", "30", "--out",
                                           str(tmp / "job")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 180 and not list((tmp / "job").glob("batch_*.npz")):
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        try:
            _, err = procs[0].communicate(timeout=180)
            rc = procs[0].returncode
        except subprocess.TimeoutExpired:
            procs[0].kill()
            err, rc = "", None
        procs[1].wait()
        name = f"distributed: rank 1 killed, run {it + 1}"
        if rc is None:
            res = {"outcome": "hang", "why": "rank 0 did not exit"}
        elif rc < 0:
            res = {"outcome": "crash", "why": f"signal {-rc}: {err.strip().splitlines()[-1:]}"}
        elif rc == 1 and "optden sample: error: rank 0" in err and "Traceback" not in err:
            kept = list((tmp / "job").glob("batch_*.npz"))
            res = {"outcome": "clear_error" if kept else "lost_work", "why": err.strip().splitlines()[-1][:120]}
        else:
            res = {"outcome": "unclear_error", "why": f"status {rc}: {err[-200:]}"}
        out.append({"name": name, "expect": "error", **res})
        print(f"  {res['outcome']:<15} {name}", flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="run the scenarios whose name contains this text")
    ap.add_argument("--runs", type=int, default=20, help="runs of the distributed scenario (default 20)")
    ap.add_argument("--jobs", type=int, default=2, help="scenarios run at once (default 2)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds before a scenario counts as a hang")
    ap.add_argument("--json", default=None, help="write the per-scenario results here")
    args = ap.parse_args()
    names = [n for n in S if args.only is None or args.only in n]
    work = Path(tempfile.mkdtemp(prefix="optden-hostile-"))
    results = []
    t0 = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
            for r in ex.map(lambda n: run_one(n, work, args.timeout), names):
                print(f"  {r['outcome']:<15} {r['name']}  ({r['why'][:110]})", flush=True)
                results.append(r)
        if args.only is None or args.only in "distributed":
            results += distributed_runs(args.runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    count = collections.Counter(r["outcome"] for r in results)
    tried = sum(v for k, v in count.items() if k != "skipped")
    print(f"\ntried {tried} (skipped {count['skipped']}) in {time.monotonic() - t0:.0f} s: "
          f"clear errors {count['clear_error']}, correct results {count['correct']}, "
          f"silent-wrong {count['silent_wrong']}, crash {count['crash']}, hang {count['hang']}, "
          f"lost work {count['lost_work']}, unclear errors {count['unclear_error']}, "
          f"errors where a result was due {count['unexpected_error']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    bad = tried - count["clear_error"] - count["correct"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
