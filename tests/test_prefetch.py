"""Out-of-core streaming: memory-mapped .npy larger than the memory budget, background prefetch."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import optden
from optden import reference as R
from optden.engine.prefetch import Prefetcher, plan_blocks
from optden.engine.rows import RowSource, parse_bytes
from tolerances import DENOISE_RTOL, LOG_DENSITY_RTOL, SIGMAS, rel_err


@pytest.fixture
def big_npy(faces_u8, tmp_path, rng):
    """Real photo patches tiled with small perturbations: (8 * M, 192) uint8, a few MB on disk."""
    reps = [faces_u8]
    for _ in range(7):
        jitter = rng.integers(-3, 4, faces_u8.shape)
        reps.append(np.clip(faces_u8.astype(np.int64) + jitter, 0, 255).astype(np.uint8))
    x = np.concatenate(reps)
    labels = rng.integers(0, 5, len(x))
    path = tmp_path / "big.npy"
    np.save(path, x)
    return path, x, labels


def test_memmap_larger_than_budget_matches_in_memory(big_npy, rng):
    path, x, labels = big_npy
    budget = 384 * 1024  # bytes of rows held at once; the file is ~7x larger
    assert path.stat().st_size > 7 * budget
    ds = optden.Dataset.from_npy(path, labels=labels)
    assert ds.is_memmap
    den = optden.OptimalDenoiser(ds, backend="torch", block_rows=1000)  # the budget shrinks the blocks
    src = den.source()
    src.memory_budget = budget
    assert src.streams
    mem = optden.OptimalDenoiser(optden.Dataset.from_array(x, labels=labels), block_rows=1000)
    assert not mem.source().streams
    y = ds.model_rows(np.arange(ds.M)).numpy()
    for sigma in SIGMAS[::3]:
        i = rng.integers(0, len(y), 3)
        q = np.concatenate([y[i] + sigma * rng.standard_normal((3, y.shape[1])), rng.standard_normal((2, y.shape[1]))])
        qt = torch.from_numpy(q)
        got = den(qt, sigma)
        assert not torch.isnan(got).any()
        assert rel_err(got, mem(qt, sigma)) <= DENOISE_RTOL, sigma
        assert rel_err(got, R.denoise(q, y, sigma)) <= DENOISE_RTOL, sigma
        ld, ldr = den.log_density(qt, sigma).numpy(), R.log_density(q, y, sigma)
        assert np.max(np.abs(ld - ldr) / np.abs(ldr)) <= LOG_DENSITY_RTOL, sigma
    st = src.stats
    assert st.rows_read >= 2 * len(SIGMAS[::3]) * ds.M  # every pass streamed the whole file
    assert 0 < st.peak_bytes <= budget  # never more than the budget of rows at once
    assert st.capacity_rows * st.row_bytes <= budget
    rows, slots = src.stream_plan()
    assert rows * 2 * st.row_bytes <= budget and slots >= 2

    # class-conditional: a gathered (non-contiguous) row source, streamed under the same budget
    lab = torch.tensor([0, 3, 3, 1])
    q = torch.from_numpy(y[:4] + 0.1 * rng.standard_normal((4, y.shape[1])))
    den.source(3).memory_budget = budget
    got = den(q, 0.1, labels=lab)
    for j in range(4):
        ref = R.denoise(q[j : j + 1].numpy(), y[labels == int(lab[j])], 0.1)
        assert rel_err(got[j : j + 1], ref) <= DENOISE_RTOL
    assert 0 < den.source(3).stats.peak_bytes <= budget
    # posterior and nearest go through the same streamed pass
    w, idx = den.posterior(q, 0.05, k=3)
    wr, ir = mem.posterior(q, 0.05, k=3)
    assert torch.equal(idx, ir) and torch.allclose(w, wr, rtol=DENOISE_RTOL)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_float_memmaps_stream_exactly(dtype, tmp_path, rng, monkeypatch):
    x = rng.standard_normal((301, 37)).astype(np.float32)  # d not a power of two, odd M
    if dtype == "bfloat16":
        store = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        store = x.astype(dtype)
    np.save(tmp_path / "x.npy", store)
    monkeypatch.setenv("OPTDEN_MEMORY_BUDGET", "2k")  # through the environment this time
    ds = optden.Dataset.from_npy(tmp_path / "x.npy", dtype=dtype if dtype == "bfloat16" else None)
    den = optden.OptimalDenoiser(ds, backend="torch", block_rows=64)
    mem = optden.OptimalDenoiser(optden.Dataset.from_array(np.array(ds.raw), dtype=dtype if dtype == "bfloat16" else None),
                                 block_rows=64)
    q = torch.from_numpy(rng.standard_normal((3, 37)))
    for sigma in (1e-3, 0.3, 1e3):
        assert rel_err(den(q, sigma), mem(q, sigma)) <= DENOISE_RTOL
        assert rel_err(den(q, sigma), R.denoise(q.numpy(), ds.model_rows(np.arange(301)).numpy(), sigma)) <= DENOISE_RTOL
    st = den.source().stats
    assert 0 < st.peak_bytes <= 2048 and st.rows_read >= 3 * 301


def test_prefetcher_delivers_every_block_in_order_with_a_slow_consumer(rng):
    data = rng.integers(0, 256, (103, 5), dtype=np.uint8)
    ranges = plan_blocks(0, 103, 10)  # the last block is short
    reader_threads = set()

    def load(a, b, out):
        reader_threads.add(threading.current_thread().name)
        np.copyto(out, data[a:b])

    pf = Prefetcher(load, ranges, 5, np.uint8, torch.uint8, torch.device("cpu"), 10, slots=3)
    seen = []
    for a, blk in pf:
        time.sleep(0.002)  # the reader runs ahead meanwhile, but never into the block in use
        assert torch.equal(blk, torch.from_numpy(data[a : a + blk.shape[0]]))
        seen.append((a, a + blk.shape[0]))
    assert seen == ranges
    assert reader_threads == {"optden-prefetch"}  # small blocks: one reader
    assert pf.stats.blocks == 11 and pf.stats.rows_read == 103
    assert pf.stats.peak_rows <= 30  # three buffers of 10 rows


def test_large_blocks_are_read_by_parallel_threads(rng):
    data = rng.integers(0, 256, (4001, 4096), dtype=np.uint8)  # 16 MB; blocks of 10 MB, split in 2
    names = set()

    def load(a, b, out):
        names.add(threading.current_thread().name)
        np.copyto(out, data[a:b])

    pf = Prefetcher(load, plan_blocks(0, 4001, 2500), 4096, np.uint8, torch.uint8, torch.device("cpu"), 2500,
                    slots=2, readers=3)
    total = 0
    for a, blk in pf:
        assert torch.equal(blk, torch.from_numpy(data[a : a + blk.shape[0]]))
        total += blk.shape[0]
    assert total == 4001 and pf.stats.peak_rows <= 5000
    assert len(names) >= 2 and all(n.startswith("optden-prefetch") for n in names)


def test_prefetcher_errors_and_early_stop():
    def bad(a, b, out):
        if a >= 20:
            raise OSError("disk gone")
        out[:] = 1

    pf = Prefetcher(bad, plan_blocks(0, 50, 10), 4, np.uint8, torch.uint8, torch.device("cpu"), 10)
    got = []
    with pytest.raises(OSError, match="disk gone"):
        for a, _ in pf:
            got.append(a)
    assert got == [0, 10]
    pf2 = Prefetcher(lambda a, b, out: out.fill(2), plan_blocks(0, 1000, 10), 4, np.uint8, torch.uint8,
                     torch.device("cpu"), 10)
    for a, _ in pf2:
        if a == 30:
            break
    pf2.close()
    assert not pf2._thread.is_alive()  # the reader stopped; no thread left behind
    with pytest.raises(ValueError, match="slots"):
        Prefetcher(bad, [], 4, np.uint8, torch.uint8, torch.device("cpu"), 10, slots=1)


def test_budget_parsing_and_too_small_budget(digits_u8, tmp_path):
    assert parse_bytes("64M") == 64 << 20 and parse_bytes("2GiB") == 2 << 30 and parse_bytes(512) == 512
    assert parse_bytes(None) is None
    for bad in ("lots", -1, 0, True):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_bytes(bad)
    np.save(tmp_path / "d.npy", digits_u8)
    ds = optden.Dataset.from_npy(tmp_path / "d.npy")
    src = RowSource(ds, torch.device("cpu"), 100, memory_budget=100)  # < two rows of 64 bytes
    with pytest.raises(ValueError, match="two rows"):
        next(src.blocks())
    # M = 1 and a budget of exactly two rows still work
    one = np.save(tmp_path / "one.npy", digits_u8[:1]) or optden.Dataset.from_npy(tmp_path / "one.npy")
    den = optden.OptimalDenoiser(one, backend="torch")
    den.source().memory_budget = 128
    q = torch.randn(2, 64, dtype=torch.float64)
    assert torch.allclose(den(q, 0.5), one.model_rows([0]).expand(2, 64), rtol=0, atol=1e-12)
