"""Full disks, killed builds, two runs on one directory, stale temporaries, damaged batches
(issue 17, items 3, 6, 7 and the file cases of 10).

A full disk is simulated two ways: a small tmpfs (the real thing; needs root to mount, else
skipped) and an ENOSPC raised by the write itself (runs everywhere).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import optden
from optden import fileio
from optden.cli import main
from optden.data import ingest
from optden.jobs import run_sample_job

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextlib.contextmanager
def small_disk(tmp_path, size: str):
    """A tmpfs of ``size`` mounted in tmp_path (root only; skips the test otherwise)."""
    mnt = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def grow(mnt: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mnt)], check=True)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    """A folder of 160 random 16x16 RGB PNGs."""
    root = tmp_path_factory.mktemp("pngs")
    g = np.random.default_rng(1)
    for i in range(160):
        Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def den():
    return optden.OptimalDenoiser(optden.Dataset.demo("digits", max_rows=300))


# ----------------------------------------------------------------------------- item 3: full disks


def test_full_tmpfs_sample_job_keeps_batches_then_resumes(tmp_path, den):
    """samples.npy was assembled through a memory map: SIGBUS (signal 7, no message) on a
    full disk. Now: a DiskFullError naming the directory and the bytes; every finished
    batch stays; with room again the same command finishes and equals a run elsewhere."""
    ref = run_sample_job(den, tmp_path / "ref", n=900, batch_size=150, steps=2, seed=3)
    with small_disk(tmp_path, "1200k") as mnt:
        cmd = [sys.executable, "-m", "optden.cli", "sample", "demo:digits", "--n", "900", "--batch-size", "150",
               "--steps", "2", "--seed", "3", "--out", str(mnt / "job")]
        with pytest.raises(optden.errors.DiskFullError, match=f"no space left on {mnt / 'job'}"):
            run_sample_job(den, mnt / "job", n=900, batch_size=150, steps=2, seed=3)
        kept = sorted(p.name for p in (mnt / "job").glob("batch_*.npz"))
        assert kept and not list((mnt / "job").glob(".*.tmp-*"))
        grow(mnt, "8m")
        res = run_sample_job(den, mnt / "job", n=900, batch_size=150, steps=2, seed=3)
        assert len(res.skipped) == len(kept)
        assert torch.equal(res.samples, ref.samples)
    with small_disk(tmp_path, "600k") as mnt:
        proc = subprocess.run(cmd[:-1] + [str(mnt / "cli")], env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"optden sample: error: no space left on {mnt / 'cli'}" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_full_tmpfs_dataset_build_keeps_chunks_then_resumes(tmp_path, pngs):
    """dataset build assembled its array through a memory map too."""
    ref, _ = ingest.build_dataset(pngs, tmp_path / "ref", chunk_size=32, progress=False)
    with small_disk(tmp_path, "200k") as mnt:
        with pytest.raises(optden.errors.DiskFullError, match="no space left on"):
            ingest.build_dataset(pngs, mnt / "ds", chunk_size=32, progress=False)
        chunks = list((mnt / "ds" / ".build").glob("chunk_*.npy"))
        assert chunks
        grow(mnt, "2m")
        ds, rep = ingest.build_dataset(pngs, mnt / "ds", chunk_size=32, progress=False)
        assert rep.chunks_skipped == len(chunks)
        assert np.array_equal(np.asarray(ds.raw), np.asarray(ref.raw))
    with small_disk(tmp_path, "150k") as mnt:
        proc = subprocess.run([sys.executable, "-m", "optden.cli", "dataset", "build", str(pngs), str(mnt / "cli"),
                               "--chunk-size", "32"], env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and "optden dataset: error: no space left on" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_read_only_disk_is_a_clear_error_in_every_writing_command(tmp_path, pngs):
    """demo, sample, meanshift, deviation, index and dataset build on a read-only file system:
    `optden CMD: error: ...`, status 1, no traceback."""
    optden.Dataset.demo("digits", max_rows=120).save(tmp_path / "ds")
    with small_disk(tmp_path, "1m") as mnt:
        optden.Dataset.demo("digits", max_rows=120).save(mnt / "ds")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        cmds = [["demo", "--quick", "--max-rows", "120", "--out", str(mnt / "rep")],
                ["sample", "demo:digits", "--n", "2", "--steps", "2", "--out", str(mnt / "job")],
                ["meanshift", str(tmp_path / "ds"), "--n", "2", "--out", str(mnt / "ms")],
                ["deviation", str(tmp_path / "ds"), "--n", "2", "--out", str(mnt / "dev")],
                ["index", str(mnt / "ds"), "--kind", "flat"],
                ["dataset", "build", str(pngs), str(mnt / "built")]]
        for cmd in cmds:
            proc = subprocess.run([sys.executable, "-m", "optden.cli", *cmd], env=_env(), capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 1, (cmd, proc.stderr[-2000:])
            assert f"optden {cmd[0]}: error: Read-only file system" in proc.stderr, (cmd, proc.stderr[-2000:])
            assert "Traceback" not in proc.stderr, cmd


def test_enospc_from_the_write_is_a_disk_full_error(tmp_path, monkeypatch):
    """Everywhere (no root needed): the no-space errno of a write, or of the reservation,
    becomes DiskFullError naming the directory and the bytes, and no temporary is left."""
    arr = np.arange(1000, dtype=np.float64).reshape(100, 10)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(optden.errors.DiskFullError) as e:
        fileio.atomic_write_npy(tmp_path / "a.npy", arr.dtype, arr.shape, [arr[:50], arr[50:]])
    assert str(e.value) == f"no space left on {tmp_path} (needed {8000 + 128} bytes)"
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    fileio.atomic_write_npy(tmp_path / "a.npy", arr.dtype, arr.shape, [arr[:50], arr[50:]])
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
    # a plain atomic_write whose write hits EDQUOT
    with pytest.raises(optden.errors.DiskFullError, match=r"needed 5 bytes"):
        fileio.atomic_write(tmp_path / "b.json", lambda f: full(), size=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]
    # FAISS says it in words
    err = fileio.foreign_write_error(RuntimeError("write error in x.faiss: 3 != 4 (No space left on device)"),
                                     tmp_path / "x.faiss", 16)
    assert isinstance(err, optden.errors.DiskFullError) and "needed about 16 bytes" in str(err)


def test_no_memory_mapped_writes_remain():
    """SIGBUS is impossible by construction: no optden module writes through a memory map."""
    for p in (ROOT / "optden").rglob("*.py"):
        text = p.read_text()
        assert "open_memmap" not in text and 'mode="w+"' not in text and "mode='w+'" not in text, p


# ----------------------------------------------------------------------------- item 6: atomic build commit


def test_build_killed_between_save_and_marker_resumes(tmp_path, pngs, monkeypatch):
    """A kill after Dataset.save wrote meta.json and before build.json left a directory every
    rerun refused ("not made by optden dataset build"). The marker now comes first and
    meta.json (the save's own commit) last; and a directory left by the old order resumes."""
    ref, _ = ingest.build_dataset(pngs, tmp_path / "ref", chunk_size=64, progress=False)
    out = tmp_path / "ds"

    class Killed(BaseException):
        pass

    real_save = optden.Dataset.save

    def save_then_die(self, dir):
        real_save(self, dir)
        raise Killed  # after meta.json, before .build is removed

    monkeypatch.setattr(optden.Dataset, "save", save_then_die)
    with pytest.raises(Killed):
        ingest.build_dataset(pngs, out, chunk_size=64, progress=False)
    monkeypatch.undo()
    assert (out / "meta.json").is_file() and (out / "build.json").is_file() and (out / ".build").is_dir()
    ds, rep = ingest.build_dataset(pngs, out, chunk_size=64, progress=False)
    assert rep.already_built and not (out / ".build").exists()
    assert np.array_equal(np.asarray(ds.raw), np.asarray(ref.raw))
    # the old order's remains: meta.json written, build.json not, .build intact
    out2 = tmp_path / "old"
    monkeypatch.setattr(optden.Dataset, "save", save_then_die)
    with pytest.raises(Killed):
        ingest.build_dataset(pngs, out2, chunk_size=64, progress=False)
    monkeypatch.undo()
    (out2 / "build.json").unlink()
    ds2, rep2 = ingest.build_dataset(pngs, out2, chunk_size=64, progress=False)
    assert rep2.chunks_skipped == rep2.chunks and np.array_equal(np.asarray(ds2.raw), np.asarray(ref.raw))
    # a kill before the save: build.json written, meta.json not: resumes from the chunks
    out3 = tmp_path / "mid"

    def die(self, dir):
        raise Killed

    monkeypatch.setattr(optden.Dataset, "save", die)
    with pytest.raises(Killed):
        ingest.build_dataset(pngs, out3, chunk_size=64, progress=False)
    monkeypatch.undo()
    assert (out3 / "build.json").is_file() and not (out3 / "meta.json").exists()
    ds3, rep3 = ingest.build_dataset(pngs, out3, chunk_size=64, progress=False)
    assert not rep3.already_built and rep3.chunks_skipped == rep3.chunks
    assert np.array_equal(np.asarray(ds3.raw), np.asarray(ref.raw))


def test_resumed_build_notices_a_changed_source_image(tmp_path, pngs):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(pngs, src)
    out = tmp_path / "ds"

    class Killed(BaseException):
        pass

    calls = []
    real = ingest.atomic_write_npy

    def die_at_chunk_3(path, *a):
        if Path(path).name.startswith("chunk_"):
            calls.append(path)
            if len(calls) == 3:
                raise Killed
        return real(path, *a)

    ingest.atomic_write_npy = die_at_chunk_3
    try:
        with pytest.raises(Killed):
            ingest.build_dataset(src, out, chunk_size=32, progress=False, workers=1)
    finally:
        ingest.atomic_write_npy = real
    new = np.full((16, 16, 3), 7, np.uint8)
    Image.fromarray(new).save(src / "0005.png")  # in chunk 0, already on disk
    ds, rep = ingest.build_dataset(src, out, chunk_size=32, progress=False)
    assert rep.chunks_skipped == 1  # chunk 1 only: chunk 0's image changed
    np.testing.assert_array_equal(np.asarray(ds.raw[5]), new.transpose(2, 0, 1).reshape(-1))


# ----------------------------------------------------------------------------- item 7: job lock


def test_second_run_on_one_directory_fails_clearly(tmp_path, den):
    """Two `optden sample --out` runs on one directory deleted each other's temporaries (3 of
    7 died with raw FileNotFoundError). The job directory is locked: the second run is
    refused at once, naming the directory and the holder."""
    out = tmp_path / "job"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from optden.fileio import DirectoryLock\n"
        f"with DirectoryLock({str(out)!r}, 'out'):\n    print('locked', flush=True); time.sleep(60)")],
        env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(optden.InputError, match=f"out: {out} is in use by another run \\(pid {holder.pid}\\)"):
            run_sample_job(den, out, n=3, batch_size=2, steps=2)
        assert main(["sample", "demo:digits", "--n", "2", "--steps", "2", "--out", str(out)]) == 2
    finally:
        holder.kill()
        holder.wait()
    res = run_sample_job(den, out, n=3, batch_size=2, steps=2)  # the lock died with its holder
    assert res.computed == [0, 1]


def test_concurrent_cli_runs_never_crash(tmp_path):
    """Several `optden sample` processes on one directory: each either finishes or exits 2
    with the clear message; none dies with a traceback, and the result is complete."""
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "optden.cli", "sample", "demo:digits", "--n", "24", "--batch-size", "4",
           "--steps", "3", "--out", str(out)]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    assert set(codes) <= {0, 2} and 0 in codes, (codes, [o[1][-500:] for o in outs])
    for code, (_, err) in zip(codes, outs):
        assert "Traceback" not in err
        if code == 2:
            assert "is in use by another run" in err
    assert np.load(out / "samples.npy").shape == (24, 1, 8, 8)


# ----------------------------------------------------------------------------- item 10: files


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    ds = optden.Dataset.demo("digits", max_rows=20)
    d = tmp_path / "ds"
    d.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / f"data.npy.tmp-{dead.pid}-abcd1234").write_bytes(b"x" * 100)  # a killed save's
    (d / f"norms.npz.tmp-{os.getppid()}-abcd1234").write_bytes(b"x")  # a live process's
    ds.save(d)
    names = sorted(p.name for p in d.iterdir())
    assert f"data.npy.tmp-{dead.pid}-abcd1234" not in names
    assert f"norms.npz.tmp-{os.getppid()}-abcd1234" in names


def test_bit_flipped_batch_is_detected_and_recomputed(tmp_path, den):
    out = tmp_path / "job"
    ref = run_sample_job(den, out, n=6, batch_size=3, steps=3, seed=2)
    p = out / "batch_000001.npz"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit inside the samples array
    p.write_bytes(bytes(data))
    res = run_sample_job(den, out, n=6, batch_size=3, steps=3, seed=2)
    assert res.computed == [1] and res.skipped == [0]
    assert torch.equal(res.samples, ref.samples)


def test_out_that_is_a_file_and_other_cli_inputs(tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["sample", "demo:digits", "--n", "2", "--steps", "2", "--out", str(f)]) == 2
    assert f"out: {f} exists and is not a directory" in capsys.readouterr().err
    assert main(["sample", "demo:digits", "--n", "2", "--steps", "2", "--memory-budget", "inf",
                 "--out", str(tmp_path / "j")]) == 2
    assert "--memory-budget: expected a finite number of bytes" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(optden.InputError, match="device: 'cuda' requested, but this torch build has no usable CUDA"):
            optden.OptimalDenoiser(optden.Dataset.demo("digits", max_rows=10), device="cuda")
    with pytest.raises(optden.InputError, match="device: not a torch device"):
        optden.OptimalDenoiser(optden.Dataset.demo("digits", max_rows=10), device="gpu0")
    with pytest.raises(optden.InputError, match="scale: 1e\\+200 is outside"):
        optden.Dataset.from_array(np.ones((3, 4), np.float32), scale=1e200)


def test_dataset_json_that_is_a_list(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(src / "a.png")
    (src / "dataset.json").write_text(json.dumps([["a.png", 1]]))
    with pytest.raises(optden.DatasetError, match="dataset.json holds a list; expected EDM's object"):
        ingest.build_dataset(src, tmp_path / "ds", progress=False)
    with pytest.raises(optden.DatasetError, match="dataset.json holds a list"):
        optden.Dataset.from_images(src)


def test_atomic_write_npy_takes_empty_pieces(tmp_path):
    """A piece of zero rows (a band of the patch set whose patches were all duplicates) is
    written as nothing: numpy >= 2.4 gives empty arrays zero strides, which a memoryview
    cannot cast to bytes."""
    arr = np.arange(60, dtype=np.uint8).reshape(5, 12)
    fileio.atomic_write_npy(tmp_path / "a.npy", arr.dtype, arr.shape, [arr[:0], arr[:2], arr[2:2], arr[2:], arr[5:]])
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), arr)
