"""Resumable sampling jobs: long runs that write each finished batch as they go.

``run_sample_job`` splits ``n`` samples into batches of ``batch_size``. Batch ``b``
draws its starting noise from a generator seeded by ``(seed, b)`` alone, so a batch's
result does not depend on which batches ran before it, in this process or an earlier
one. Each finished batch is written atomically (temporary file, fsync, os.replace,
fsync of the directory) as ``batch_<b>.npz`` holding the samples, x_T, the nearest and
second-nearest training rows (distances and indices), and per-sample statistics.

``manifest.json`` records the job's parameters. A run holds an exclusive lock on
``out_dir/.lock`` (``fileio.DirectoryLock``): a second run on the same directory fails at
once with a clear error instead of deleting the first one's temporary files. A batch file
whose zip CRC does not match (a flipped bit) is recomputed. A full disk is a
``DiskFullError`` naming the directory; finished batches stay. Started again with the same parameters
(after a crash, SIGKILL, or a finished run), the job skips every batch already on disk
and computes only the rest; with different parameters it refuses with
:class:`JobMismatchError` naming what differs. The final ``samples.npy``,
``nearest.npz`` and ``summary.json`` are assembled from the batch files, so they equal
an uninterrupted run's bit for bit.

Distributed (``optden.distributed.ShardedDenoiser``): every rank runs the loop (each
denoiser call is collective); rank 0 alone reads and writes ``out_dir`` and tells the
others which batches to skip.
"""
from __future__ import annotations

import contextlib
import json
import numbers
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .calling import image_shape_of, progress_enabled
from .denoiser import OptimalDenoiser
from .errors import DtypeError, InputError, OptdenError
from .fileio import DirectoryLock, atomic_write, atomic_write_npy, remove_stale_temporaries
from .memorization import MEMORIZED_RATIO, memorization
from .sampling import draw_x_T, evaluation_steps, get_solver, sample
from .schedules import get_schedule
from .validate import check_positive_int

__all__ = ["run_sample_job", "JobResult", "JobMismatchError", "batch_seed", "MEMORIZED_RATIO"]

JOB_FORMAT = "optden.sample_job"
JOB_VERSION = 1


class JobMismatchError(OptdenError, ValueError):
    """``out_dir`` holds a job with other parameters (or another dataset)."""


@dataclass
class JobResult:
    """A finished job (all float64 / int64 CPU tensors, sample order).

    samples: (n, *shape).   x_T: (n, *shape) initial noise (both None with load_results=False).
    nn_dist: (n, 2) model-space distances to the nearest and second-nearest training rows.
    nn_idx:  (n, 2) their dataset indices.   memorized: (n,) bool, NN1 / NN2 < 1/3.
    computed / skipped: batch numbers computed by this call / found on disk.
    summary: the contents of summary.json.
    """

    samples: torch.Tensor | None
    x_T: torch.Tensor | None
    nn_dist: torch.Tensor
    nn_idx: torch.Tensor
    memorized: torch.Tensor
    out_dir: Path
    computed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch``'s noise: a function of (seed, batch) only, < 2**63."""
    state = np.random.SeedSequence([int(seed) % (1 << 64), int(batch)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


# ------------------------------------------------------------------------ atomic files


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()))


# ------------------------------------------------------------------------ the job


def _check_params(n, batch_size, steps, seed):
    n = check_positive_int(n, "n")
    batch_size = check_positive_int(batch_size, "batch_size")
    steps = check_positive_int(steps, "steps")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    return n, batch_size, steps, int(seed)


def _manifest(den, n, batch_size, steps, solver, schedule, seed, label, sigma_stop, solver_options, shape):
    sched = schedule if isinstance(schedule, str) else [float(s) for s in getattr(schedule, "sigmas", schedule)]
    return {
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "params": {
            "n": n,
            "batch_size": batch_size,
            "steps": steps,
            "solver": solver,
            "schedule": sched,
            "seed": seed,
            "label": label,
            "sigma_stop": sigma_stop,
            "solver_options": {k: float(v) for k, v in sorted((solver_options or {}).items())},
            "shape": list(shape),
            "dataset": den.dataset.fingerprint,
            "tol": float(den.tol),
        },
    }


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} on disk, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def _make_dir(out: Path) -> None:
    """Create ``out`` (and its parents); InputError when it exists and is not a directory."""
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a directory; choose a directory for the job")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a parent is a file
        raise InputError(f"out: cannot create {out}: a part of the path is a file") from None


def _prepare_dir(out: Path, manifest: dict) -> None:
    """Check that the manifest in ``out`` has the same parameters, or write it (the caller
    holds the directory's lock)."""
    mpath = out / "manifest.json"
    remove_stale_temporaries(out)  # what a killed run left; a running one holds the lock
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except ValueError as e:
            raise JobMismatchError(f"out: {mpath} is not valid JSON ({e}); remove it or choose another directory") from None
        if old.get("format") != JOB_FORMAT:
            raise JobMismatchError(f"out: {out} holds something else than an optden sampling job ({mpath})")
        diffs = _diff(old.get("params", {}), manifest["params"])
        if diffs:
            raise JobMismatchError(
                f"out: {out} holds a job with different parameters; use another directory, or the same "
                "parameters to resume it. Differences: " + "; ".join(diffs)
            )
        return
    if any(out.glob("batch_*.npz")):
        raise JobMismatchError(f"out: {out} holds batch files but no manifest.json; choose another directory")
    _write_json(mpath, manifest)


def _batch_path(out: Path, b: int) -> Path:
    return out / f"batch_{b:06d}.npz"


_BATCH_KEYS = ("batch", "range", "seed", "samples", "x_T", "nn_dist", "nn_idx", "nn_ratio", "memorized", "nfe",
               "seconds")


def _load_batch(path: Path, b: int, start: int, stop: int, shape: tuple, full: bool = True):
    """The arrays of a finished batch file, or None when it is missing, damaged or not this batch.

    ``full=False`` checks the small arrays only (and that the others are present): the
    resume scan then reads kilobytes per batch, not the samples.
    """
    if not path.exists():
        return None
    rows = stop - start
    try:
        with zipfile.ZipFile(path) as zf:  # every member's CRC-32: a flipped bit means recompute
            if zf.testzip() is not None:
                return None
        with np.load(path, allow_pickle=False) as z:
            if any(k not in z.files for k in _BATCH_KEYS):
                return None
            keys = _BATCH_KEYS if full else ("batch", "range", "nn_idx")
            arrays = {k: z[k] for k in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return None
    ok = (
        int(arrays["batch"][()]) == b
        and tuple(arrays["range"]) == (start, stop)
        and arrays["nn_idx"].shape == (rows, 2)
        and (not full or arrays["samples"].shape == (rows, *shape))
    )
    return arrays if ok else None


def _run_batch(den, b, start, stop, shape, steps, solver, schedule, seed, label, sigma_stop, solver_options,
               tick=None):
    """Sample batch ``b`` (rows start:stop) and find the two nearest training rows (``memorization``).
    tick: called after every solver step (the job's progress bar), or None."""
    sched = get_schedule(schedule, steps if isinstance(schedule, str) else None)
    bseed = batch_seed(seed, b)
    t0 = time.perf_counter()
    x_T = draw_x_T(stop - start, shape, float(sched.sigmas[0]), float(sched.scales[0]), bseed)
    run = sample(den, steps=steps, solver=solver, schedule=schedule, seed=bseed, x_T=x_T, labels=label,
                 sigma_stop=sigma_stop, progress=False, callback=None if tick is None else (lambda _: tick()),
                 **(solver_options or {}))
    mem = memorization(run.samples, den, MEMORIZED_RATIO, labels=label)
    return {
        "batch": np.int64(b),
        "range": np.array([start, stop], dtype=np.int64),
        "seed": np.array(bseed, dtype=np.int64),
        "samples": run.samples.numpy(),
        "x_T": x_T.numpy(),
        "nn_dist": torch.stack([mem.nn1_distance, mem.nn2_distance], 1).numpy(),
        "nn_idx": torch.stack([mem.nn1_index, mem.nn2_index], 1).numpy(),
        "nn_ratio": mem.ratio.numpy(),
        "memorized": mem.memorized.numpy(),
        "nfe": np.int64(run.nfe),
        "seconds": np.float64(time.perf_counter() - t0),
    }


def _save_batch(path: Path, arrays: dict) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays), size=sum(np.asarray(a).nbytes for a in arrays.values()))


def _as_denoiser(den_or_dataset, device, backend, memory_budget):
    if isinstance(den_or_dataset, OptimalDenoiser):
        return den_or_dataset
    if hasattr(den_or_dataset, "raw_block"):
        den = OptimalDenoiser(den_or_dataset, device=device, backend=backend)
        if memory_budget is not None:
            den.source().memory_budget = memory_budget
        return den
    raise DtypeError(
        f"den: expected an optden.OptimalDenoiser or an optden.Dataset, got {type(den_or_dataset).__name__}"
    )


def run_sample_job(
    den,
    out_dir,
    n: int,
    batch_size: int = 64,
    steps: int = 18,
    solver: str = "heun",
    schedule="edm",
    seed: int = 0,
    *,
    label: int | None = None,
    sigma_stop: float | None = None,
    solver_options: dict | None = None,
    device="cpu",
    backend: str = "auto",
    memory_budget=None,
    progress: bool | None = None,
    log=None,
    load_results: bool = True,
) -> JobResult:
    """Sample ``n`` points with the optimal denoiser, writing each batch as it finishes.

    den: an ``OptimalDenoiser`` (or ``ShardedDenoiser``), or a ``Dataset`` (a denoiser is
        made on ``device`` with ``backend`` and ``memory_budget``).
    out_dir: the job directory (created; see the module docstring for its files).
    n, batch_size, steps, solver, schedule, seed, sigma_stop, solver_options: as in
        ``optden.sampling.sample``; batch b's noise is seeded by ``batch_seed(seed, b)``.
    label: sample from one class (class-conditional denoiser), or None.
    progress: tqdm bar that moves per solver step (default: when stderr is a terminal).
    log: callable taking a line of text (e.g. ``print``), or None.
    load_results: return the samples and x_T in memory (False: ``samples`` and ``x_T``
        are None; read ``out_dir/samples.npy``, e.g. memory-mapped, instead).

    Returns a :class:`JobResult`. Raises :class:`JobMismatchError` when ``out_dir`` holds
    a job with other parameters.
    """
    from tqdm.auto import tqdm

    n, batch_size, steps, seed = _check_params(n, batch_size, steps, seed)
    solver = get_solver(solver)
    den = _as_denoiser(den, device, backend, memory_budget)
    if den.M < 2:  # checked before any sampling: every batch ends with the NN1 / NN2 statistics
        raise InputError(f"den: a sampling job records NN1 / NN2 (memorization) and needs at least 2 training "
                         f"rows; the data set has {den.M}")
    shape = image_shape_of(den)
    if label is not None and (isinstance(label, bool) or not isinstance(label, numbers.Integral)):
        raise InputError(f"label: expected an integer class label or None, got {label!r}")
    say = log if log is not None else (lambda line: None)
    out = Path(out_dir)
    distributed = bool(getattr(den, "is_distributed", False))
    rank = den.rank if distributed else 0
    manifest = _manifest(den, n, batch_size, steps, solver, schedule, seed, label, sigma_stop, solver_options, shape)
    batches = [(b, a, min(n, a + batch_size)) for b, a in enumerate(range(0, n, batch_size))]

    with contextlib.ExitStack() as held:
        # Which batches are done: rank 0 looks, the others are told.
        done: dict[int, bool] = {}
        error = None
        if rank == 0:
            try:
                _make_dir(out)
                held.enter_context(DirectoryLock(out, "out"))  # until the job returns or fails
                _prepare_dir(out, manifest)
                for b, a, e in batches:
                    if _load_batch(_batch_path(out, b), b, a, e, shape, full=False) is not None:
                        done[b] = True
            except Exception as exc:  # re-raised on every rank below
                error = exc
        if distributed:
            import torch.distributed as dist

            msg = [None if error is None else f"{type(error).__name__}: {error}", sorted(done)]
            dist.broadcast_object_list(msg, src=0, group=den.group)
            if msg[0] is not None and error is None:
                raise JobMismatchError(f"rank 0 could not prepare {out}: {msg[0]}")
            skip = set(msg[1])
        else:
            skip = set(done)
        if error is not None:
            raise error
        if skip:
            say(f"resuming {out}: skipping {len(skip)} finished batch(es) of {len(batches)}")

        computed = []
        per_batch = evaluation_steps(schedule, steps, sigma_stop)
        bar = tqdm(total=len(batches) * per_batch, initial=len(skip) * per_batch, unit="step", desc="sample job",
                   disable=rank != 0 or not progress_enabled(progress))
        try:
            for b, a, e in batches:
                if b in skip:
                    continue
                bar.set_postfix(batch=f"{b + 1}/{len(batches)}")
                arrays = _run_batch(den, b, a, e, shape, steps, solver, schedule, seed, label, sigma_stop,
                                    solver_options, tick=lambda: bar.update(1))
                if rank == 0:
                    _save_batch(_batch_path(out, b), arrays)
                    say(f"batch {b + 1}/{len(batches)}: samples {a}..{e - 1}, "
                        f"memorized {float(arrays['memorized'].mean()):.3f}, {float(arrays['seconds']):.2f} s")
                computed.append(b)
        finally:
            bar.close()

        if rank != 0:
            return JobResult(samples=torch.empty(0), x_T=torch.empty(0), nn_dist=torch.empty(0),
                             nn_idx=torch.empty(0, dtype=torch.int64), memorized=torch.empty(0, dtype=torch.bool),
                             out_dir=out, computed=computed, skipped=sorted(skip))
        return _finish(out, manifest, batches, shape, load_results, computed, sorted(skip))


def _finish(out: Path, manifest, batches, shape, load: bool, computed, skipped) -> JobResult:
    """Assemble samples.npy, nearest.npz and summary.json by streaming the batch files.

    Only one batch is in memory at a time (samples.npy is written piece by piece through a
    file object, ``fileio.atomic_write_npy``), so a 50k-sample ImageNet-64 job needs no
    5 GB array in RAM, and a full disk is a ``DiskFullError``, not a SIGBUS.
    """
    n = batches[-1][2]
    small = {k: [] for k in ("nn_dist", "nn_idx", "nn_ratio", "memorized")}
    x_T = [] if load else None
    totals = {"nfe": 0, "seconds": 0.0}

    def pieces():
        for b, a, e in batches:
            arrays = _load_batch(_batch_path(out, b), b, a, e, shape)
            if arrays is None:
                raise JobMismatchError(f"out: {_batch_path(out, b)} vanished or was damaged while the job ran; "
                                       "run the same command again to recompute it")
            for k in small:
                small[k].append(arrays[k])
            if load:
                x_T.append(arrays["x_T"])
            totals["nfe"] = int(arrays["nfe"])
            totals["seconds"] += float(arrays["seconds"])
            yield arrays["samples"]

    atomic_write_npy(out / "samples.npy", np.float64, (n, *shape), pieces())
    nfe, seconds = totals["nfe"], totals["seconds"]
    cat = {k: np.concatenate(v) for k, v in small.items()}
    atomic_write(out / "nearest.npz", lambda f: np.savez(f, **cat))
    nn1 = cat["nn_dist"][:, 0]
    summary = {
        "n": n,
        "batches": len(batches),
        "memorized_fraction": float(cat["memorized"].mean()),
        "memorized_ratio_threshold": MEMORIZED_RATIO,
        "nn1_mean": float(nn1.mean()),
        "nn1_median": float(np.median(nn1)),
        "nn_ratio_mean": float(np.mean(cat["nn_ratio"])),
        "nfe_per_sample": nfe,
        "sampling_seconds": seconds,
        "params": manifest["params"],
    }
    _write_json(out / "summary.json", summary)
    return JobResult(
        samples=torch.from_numpy(np.load(out / "samples.npy")) if load else None,
        x_T=torch.from_numpy(np.concatenate(x_T)) if load else None,
        nn_dist=torch.from_numpy(cat["nn_dist"]),
        nn_idx=torch.from_numpy(cat["nn_idx"]),
        memorized=torch.from_numpy(cat["memorized"]),
        out_dir=out,
        computed=computed,
        skipped=skipped,
        summary=summary,
    )
