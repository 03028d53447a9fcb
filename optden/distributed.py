"""The optimal denoiser sharded over ranks with torch.distributed (NCCL on GPUs, gloo on CPU).

Each rank streams only its shard of the rows (a contiguous slice of the dataset, or of
one class's rows) through the backend's coarse pass (``optden.engine.partial.Partial``).
The per-rank partials are merged exactly, as the blocks inside one pass are:

    m   = max_r m_r
    s   = sum_r s_r   exp(m_r - m)
    acc = sum_r acc_r exp(m_r - m)
    top = the K largest of the union of every rank's top K   (rank r's row positions
          are offset into the global row order)
    delta = max_r delta_r

Every row outside the merged top K is at most the merged K-th logit (each rank's own
top K is inside the union), so ``optden.engine.precision.certify`` run on the merged partial
gives the same certificate as a single-process pass. Every rank then holds the same
merged numbers and runs the same certification (re-scoring gathers the K candidate
rows from the dataset, which every rank opens, e.g. memory-mapped on a shared file
system), so all ranks return the same D*: samplers, mean shift and score deviation run
unchanged, each rank calling the denoiser with the same inputs.

Failures: collectives time out after ``timeout`` seconds (``init_process_group``);
a rank that dies makes the others raise :class:`DistributedError` (gloo reports the
closed connection or the timeout; NCCL's watchdog aborts with async error handling on)
instead of hanging.

Launch with torchrun (one process per GPU, or per CPU socket)::

    torchrun --standalone --nproc_per_node=8 my_script.py
    # my_script.py:
    import optden, optden.distributed as odist
    device = odist.init_distributed()                  # cuda:LOCAL_RANK or cpu
    den = odist.ShardedDenoiser(optden.Dataset.load("imagenet64"), device=device)
    run = optden.sampling.sample(den, n=64, steps=18, seed=0)
    odist.shutdown()
"""
from __future__ import annotations

import datetime
import os

import numpy as np
import torch
import torch.distributed as dist

from .denoiser import OptimalDenoiser
from .engine import dispatch
from .engine.dispatch import Backend
from .engine.partial import Partial, select_topk
from .engine.precision import DEFAULT_TOL
from .engine.rows import RowSource
from .errors import BackendUnavailableError, OptdenError

__all__ = ["DistributedError", "ShardedDenoiser", "init_distributed", "shutdown", "shard_range", "merge_partials"]

#: Default seconds before a collective that a peer never joins raises.
DEFAULT_TIMEOUT = 300.0


class DistributedError(OptdenError, RuntimeError):
    """A collective failed: another rank died, timed out, or disagrees about the data."""


def shard_range(M: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` among ``world`` (contiguous, sizes differ by <= 1)."""
    return (M * rank) // world, (M * (rank + 1)) // world


def init_distributed(device=None, backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> torch.device:
    """Join the process group described by torchrun's environment; return this rank's device.

    device: None picks ``cuda:LOCAL_RANK`` when CUDA is available, else "cpu".
    backend: None picks "nccl" for CUDA devices and "gloo" for CPU.
    timeout: seconds a collective waits for the other ranks before raising.
    Already initialised: nothing is changed; the device is returned.
    """
    if not dist.is_available():
        raise BackendUnavailableError("torch.distributed is not available in this torch build")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if not dist.is_initialized() and missing:
        raise DistributedError(
            f"init_distributed: environment variables {', '.join(missing)} are not set; launch with "
            "torchrun (e.g. torchrun --standalone --nproc_per_node=2 script.py)"
        )
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:  # "cuda": this rank's GPU (set_device needs an index)
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        # NCCL: let the watchdog abort a collective whose peer died instead of hanging
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)))
    return device


def shutdown() -> None:
    """Leave the process group cleanly: a barrier (so no rank tears its connections down
    while another still talks to it), then ``destroy_process_group``. Idempotent."""
    if dist.is_available() and dist.is_initialized():
        try:
            _collective("barrier at shutdown", dist.barrier)
        finally:
            dist.destroy_process_group()


def _collective(what: str, fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except RuntimeError as exc:  # gloo / NCCL errors (DistBackendError is a RuntimeError)
        rank = dist.get_rank() if dist.is_initialized() else -1
        _abandon_group()
        raise DistributedError(
            f"rank {rank}: {what} across ranks failed (a rank died, hung past the timeout, or the "
            f"process group broke): {exc}"
        ) from exc


def _abandon_group() -> None:
    """Tear down a process group whose collective failed, before the error propagates.

    A broken group left alive keeps gloo's / NCCL's threads running into interpreter
    exit, where destroying them aborts the process ("terminate called without an active
    exception", SIGABRT) instead of letting it exit with the error. Nothing can use the
    group after a failed collective anyway."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # already half gone: nothing more to release
            pass


def merge_partials(p: Partial, k: int, group=None) -> Partial:
    """Merge every rank's ``Partial`` (same N, K = k, global positions) into the global one.

    Three collectives: one MAX all_reduce of (m, delta), one SUM all_reduce of
    (s, acc) rescaled to the global max, one all_gather of the top K (values, positions).
    """
    n, d = p.acc.shape
    world = dist.get_world_size(group)
    mx = torch.stack([p.m, p.delta])
    _collective("all_reduce(max)", dist.all_reduce, mx, op=dist.ReduceOp.MAX, group=group)
    m, delta = mx[0], mx[1]
    s, acc = p.scaled_to(m)  # 0 where this rank has no rows (m_r = -inf)
    sums = torch.cat([s[:, None], acc], dim=1)
    _collective("all_reduce(sum)", dist.all_reduce, sums, op=dist.ReduceOp.SUM, group=group)
    # positions are < 2^53, exact in float64: one gather for values and positions
    top = torch.cat([p.top_val, p.top_idx.to(torch.float64)], dim=1).contiguous()
    parts = [torch.empty_like(top) for _ in range(world)]
    _collective("all_gather(top-k)", dist.all_gather, parts, top, group=group)
    vals = torch.cat([t[:, :k] for t in parts], dim=1)
    idxs = torch.cat([t[:, k:] for t in parts], dim=1)
    top_val, top_idx = select_topk(vals, idxs, k)
    top_idx = top_idx.to(torch.int64)
    return Partial(m=m, s=sums[:, 0].contiguous(), acc=sums[:, 1:].contiguous(), top_val=top_val,
                   top_idx=top_idx, delta=delta)


class _ShardedBackend(Backend):
    """Wraps a backend: the coarse pass over this rank's shard, merged across ranks."""

    def __init__(self, owner: "ShardedDenoiser", inner: Backend):
        self.owner = owner
        self.inner = inner
        self.name = inner.name
        self.priority = inner.priority
        self.description = f"{inner.description} (sharded over torch.distributed)"

    def partial(self, v: torch.Tensor, coef: torch.Tensor, source, k: int) -> Partial:
        """v: (N, d) float64 centered raw queries; coef: (N,); source: a global row source."""
        shard, lo = self.owner.shard_of(source)
        n, d = v.shape
        dev = v.device
        if shard is None:
            p = Partial.empty(n, d, k, dev)
        else:
            kl = min(k, shard.M)
            p = self.inner.partial(v, coef, shard, kl)
            top_idx = p.top_idx + lo
            top_val = p.top_val
            if kl < k:  # a shard smaller than k: pad with rows that never win
                pad = k - kl
                top_val = torch.cat([top_val, torch.full((n, pad), -torch.inf, dtype=torch.float64, device=dev)], 1)
                top_idx = torch.cat([top_idx, torch.zeros(n, pad, dtype=torch.int64, device=dev)], 1)
            p = Partial(m=p.m, s=p.s, acc=p.acc, top_val=top_val, top_idx=top_idx, delta=p.delta)
        return merge_partials(p, k, self.owner.group)


class ShardedDenoiser(OptimalDenoiser):
    """``OptimalDenoiser`` whose dense passes are split over the ranks of a process group.

    Same arguments and call signature as ``OptimalDenoiser`` (``den(x, sigma)``,
    ``score``, ``log_density``, ``posterior``, ``nearest``, ``denoise_certified``), plus:

    group: the torch.distributed process group (default: the world).
    memory_budget: bytes of raw rows each rank's streamed pass may hold at once
        (see ``optden.engine.rows.RowSource``).

    Every rank must construct it with the same dataset and call it with the same
    inputs, in the same order (each call is collective). Results are identical on
    every rank. Call :func:`init_distributed` first.
    """

    def __init__(self, dataset, device="cpu", backend: str = "auto", tol: float = DEFAULT_TOL, topk: int = 64,
                 block_rows: int | None = None, resident="auto", memory_budget=None, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedError(
                "ShardedDenoiser: torch.distributed is not initialised; call optden.distributed.init_distributed() "
                "in a process launched by torchrun"
            )
        # The global row source (for re-scoring and the rare exact pass) is never resident.
        # prune="off": a whole-dataset index on every rank would undo the sharding.
        super().__init__(dataset, device, backend, tol, topk, block_rows, resident=False, prune="off")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.memory_budget = memory_budget
        self._shard_resident_req = resident
        self.local_backend = self.backend
        self.backend = _ShardedBackend(self, self.local_backend)
        self._shards: dict = {}
        self._label_of: dict = {}
        self._check_same_dataset()

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rank={self.rank}/{self.world_size})"

    def _check_same_dataset(self) -> None:
        ds = self.dataset
        mine = torch.tensor([float(ds.M), float(ds.d), float(np.sum(ds.centered_sqnorms)),
                             float(np.sum(ds.center))], dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        _collective("all_gather(dataset check)", dist.all_gather, parts, mine, group=self.group)
        for r, t in enumerate(parts):
            if not torch.equal(t, parts[0]):
                raise DistributedError(
                    f"ranks disagree about the dataset: rank 0 has (M, d) = ({int(parts[0][0])}, {int(parts[0][1])}), "
                    f"rank {r} has ({int(t[0])}, {int(t[1])}) or different contents"
                )

    def source(self, label: int | None = None) -> RowSource:
        src = super().source(label)
        if self.memory_budget is not None:
            src.memory_budget = self.memory_budget
        self._label_of[id(src)] = label
        return src

    def _global_index(self, label):
        if label is None:
            return None
        return np.asarray(self.dataset.rows_with_label(label), dtype=np.int64)

    def shard(self, label: int | None = None) -> tuple[RowSource | None, int]:
        """This rank's shard of the rows (of class ``label``): ``(source or None if empty, lo)``.

        ``lo`` is the position of the shard's first row in the global source's order.
        """
        if label not in self._shards:
            glob = self._global_index(label)
            total = self.M if glob is None else glob.shape[0]
            lo, hi = shard_range(total, self.rank, self.world_size)
            if hi <= lo:
                self._shards[label] = (None, lo)
            else:
                index = np.arange(lo, hi, dtype=np.int64) if glob is None else glob[lo:hi]
                resident = self._shard_resident(hi - lo)
                src = RowSource(self.dataset, self.device, self.block_rows, index=index, resident=resident,
                                memory_budget=self.memory_budget)
                self._shards[label] = (src, lo)
        return self._shards[label]

    def shard_of(self, source: RowSource) -> tuple[RowSource | None, int]:
        """The shard matching a global row source made by ``source()``."""
        if id(source) not in self._label_of:
            raise DistributedError("ShardedDenoiser: a row source that this denoiser did not create was passed")
        return self.shard(self._label_of[id(source)])

    def _shard_resident(self, rows: int) -> bool:
        req = self._shard_resident_req
        if req is True or req is False:
            return req
        if self.device.type != "cuda":
            return False
        itemsize = np.dtype(self.dataset.raw.dtype).itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        return rows * self.d * itemsize < free // 2

    def _fallback(self, src: RowSource, k: int):
        if self.local_backend.name == "torch":
            return None
        precise = _ShardedBackend(self, dispatch.get("torch"))
        return lambda v, coef: precise.partial(v, coef, src, k)

    @property
    def is_distributed(self) -> bool:
        return True
