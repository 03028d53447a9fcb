"""Resumable sampling jobs (optden.jobs, ``optden sample``): SIGKILL and resume, batch independence."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import optden
from optden.jobs import JobMismatchError, batch_seed, run_sample_job
from optden.sampling import draw_x_T, sample
from optden.schedules import get_schedule

ROOT = Path(__file__).resolve().parent.parent
CMD = [sys.executable, "-m", "optden.cli", "sample", "demo:digits", "--n", "32", "--batch-size", "4",
       "--steps", "8", "--seed", "3", "--solver", "heun"]
NB = 8  # batches


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _batches(d: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.glob("batch_*.npz"))}


def test_sigkill_then_same_command_resumes_and_matches_uninterrupted(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    # the uninterrupted reference runs alongside
    ref = subprocess.Popen(CMD + ["--out", str(full)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    # the interrupted run: SIGKILL as soon as its first batch file is on disk
    proc = subprocess.Popen(CMD + ["--out", str(cut)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (cut / "batch_000000.npz").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no batch file appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = _batches(cut)
    assert 1 <= len(before) < NB, "the run finished before it could be killed"
    assert not (cut / "samples.npy").exists()

    again = subprocess.run(CMD + ["--out", str(cut)], env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    m = re.search(r"skipping (\d+) finished batch", again.stdout)
    assert m and int(m.group(1)) == len(before), again.stdout
    assert f"computed {NB - len(before)} batch(es)" in again.stdout
    after = _batches(cut)
    assert len(after) == NB
    for name, stamp in before.items():  # finished batches were not redone
        assert after[name] == stamp
    assert not list(cut.glob(".*.tmp-*"))

    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    a, b = np.load(full / "samples.npy"), np.load(cut / "samples.npy")
    assert a.shape == (32, 1, 8, 8) and not np.isnan(a).any()
    assert a.tobytes() == b.tobytes()  # bit for bit
    with np.load(full / "nearest.npz") as za, np.load(cut / "nearest.npz") as zb:
        for k in ("nn_dist", "nn_idx", "memorized"):
            assert za[k].tobytes() == zb[k].tobytes(), k


@pytest.fixture(scope="module")
def den():
    return optden.OptimalDenoiser(optden.Dataset.demo("digits", max_rows=400))


def test_batches_are_independent_of_the_interruption(den, tmp_path):
    res = run_sample_job(den, tmp_path / "j", n=7, batch_size=3, steps=5, solver="euler", seed=11)
    assert res.computed == [0, 1, 2] and res.samples.shape == (7, 1, 8, 8)
    # batch 2 (rows 6..6) alone equals the job's rows: its noise depends on (seed, batch) only
    sched = get_schedule("edm", 5)
    x_T = draw_x_T(1, (1, 8, 8), float(sched.sigmas[0]), 1.0, batch_seed(11, 2))
    alone = sample(den, steps=5, solver="euler", x_T=x_T, seed=batch_seed(11, 2))
    assert torch.equal(alone.samples, res.samples[6:7])
    assert torch.equal(res.x_T[6:7], x_T)
    # nearest neighbours are the true ones
    y = den.dataset.model_rows(np.arange(den.M)).numpy()
    d = np.linalg.norm(res.samples.reshape(7, -1).numpy()[:, None] - y[None], axis=2)
    np.testing.assert_allclose(res.nn_dist.numpy(), np.sort(d, axis=1)[:, :2], rtol=1e-12, atol=1e-12)
    assert res.summary["n"] == 7 and res.summary["batches"] == 3


def test_crash_in_process_resume_and_corrupt_batch(den, tmp_path):
    out = tmp_path / "j"
    seen = []

    def crash(line):
        seen.append(line)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_sample_job(den, out, n=10, batch_size=3, steps=4, seed=5, log=crash)
    assert sorted(p.name for p in out.glob("batch_*.npz")) == ["batch_000000.npz", "batch_000001.npz"]
    (out / "batch_000001.npz").write_bytes(b"not an npz")  # a damaged file is recomputed
    res = run_sample_job(den, out, n=10, batch_size=3, steps=4, seed=5)
    assert res.skipped == [0] and res.computed == [1, 2, 3]
    ref = run_sample_job(den, tmp_path / "ref", n=10, batch_size=3, steps=4, seed=5)
    assert torch.equal(res.samples, ref.samples) and torch.equal(res.nn_idx, ref.nn_idx)


def test_refuses_other_parameters_and_bad_input(den, tmp_path):
    out = tmp_path / "j"
    run_sample_job(den, out, n=4, batch_size=2, steps=3, seed=1)
    with pytest.raises(JobMismatchError, match="seed: 1 on disk, 2 now"):
        run_sample_job(den, out, n=4, batch_size=2, steps=3, seed=2)
    with pytest.raises(JobMismatchError, match="batch_size"):
        run_sample_job(den, out, n=4, batch_size=4, steps=3, seed=1)
    other = optden.OptimalDenoiser(optden.Dataset.demo("digits", max_rows=300))
    with pytest.raises(JobMismatchError, match="dataset"):
        run_sample_job(other, out, n=4, batch_size=2, steps=3, seed=1)
    with pytest.raises(ValueError, match="n"):
        run_sample_job(den, tmp_path / "k", n=0, batch_size=2, steps=3)
    with pytest.raises(ValueError, match="seed"):
        run_sample_job(den, tmp_path / "k", n=2, batch_size=2, steps=3, seed=-1)
    with pytest.raises(ValueError, match="solver"):
        run_sample_job(den, tmp_path / "k", n=2, batch_size=2, steps=3, solver="rk45")
    with pytest.raises(TypeError, match="den"):
        run_sample_job("digits", tmp_path / "k", n=2)


def test_cli_on_a_memmapped_npy_with_a_memory_budget(digits_u8, tmp_path, capsys):
    from optden.cli import main

    np.save(tmp_path / "d.npy", digits_u8[:500])
    out = tmp_path / "job"
    args = ["sample", str(tmp_path / "d.npy"), "--n", "3", "--batch-size", "2", "--steps", "3", "--seed", "4",
            "--backend", "torch", "--memory-budget", "8k", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "computed 2 batch(es), skipped 0" in text and "storage='memmap" in text
    samples = np.load(out / "samples.npy")
    assert samples.shape == (3, 64) and not np.isnan(samples).any()
    assert main(args) == 0 and "computed 0 batch(es), skipped 2" in capsys.readouterr().out
    assert main(["sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "not a dataset directory" in capsys.readouterr().err
    assert main(args[:-3] + ["--steps", "4", "--out", str(out)]) == 2
    assert "different parameters" in capsys.readouterr().err
