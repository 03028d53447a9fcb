"""Certified FAISS pruning: evaluate from exact re-scored neighbours when the rows left
out provably weigh less than the tolerance, and run the dense pass otherwise.

* ``index``: ``PruneIndex`` (build, save beside the dataset, load; a candidate search
  whose every answer carries a rigorous bound on the rows it left out).
* ``pruner``: ``Pruner`` (certified evaluation from candidates; what it cannot certify
  goes dense).
* ``cache``: ``NeighbourCache`` (certified candidate sets reused along a trajectory).

The rounding bounds of FAISS's float32 distances are ``optden.engine.bounds``'.
"""
from __future__ import annotations

from .cache import NeighbourCache
from .index import KINDS, Candidates, PruneIndex, faiss_gpu_available, index_paths
from .pruner import PrunedResult, Pruner, exact_candidates, shell_log_mass

__all__ = ["PruneIndex", "Candidates", "index_paths", "KINDS", "faiss_gpu_available", "Pruner", "PrunedResult",
           "exact_candidates", "shell_log_mass", "NeighbourCache"]
