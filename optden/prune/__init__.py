"""Certified pruning: evaluate from exact re-scored neighbours when the rows left out
provably weigh less than the tolerance, and run the dense pass otherwise.

* ``embedding``: ``EmbeddingIndex``, the certified lower-bound embedding (principal
  directions + the residual's norm, leaves with exact boxes, FAISS scans): the index that
  certifies what the posterior allows.
* ``policy``: ``PrunePolicy``, prune="auto"'s cost model (pruned or dense, per
  evaluation and group of queries).
* ``index``: ``PruneIndex`` (FAISS flat / IVF over the rows themselves; build, save beside
  the dataset, load; a candidate search whose every answer carries a rigorous bound on the
  rows it left out).
* ``pruner``: ``Pruner`` (certified evaluation from candidates; what it cannot certify
  goes dense).
* ``cache``: ``NeighbourCache`` (certified candidate sets reused along a trajectory).

The rounding bounds of FAISS's float32 distances are ``optden.engine.bounds``'.
"""
from __future__ import annotations

from .cache import NeighbourCache
from .embedding import EmbeddingIndex
from .index import KINDS, Candidates, PruneIndex, faiss_gpu_available, index_paths
from .policy import PrunePolicy
from .pruner import PrunedResult, Pruner, exact_candidates, exact_sq_distances, shell_log_mass

__all__ = ["EmbeddingIndex", "PrunePolicy", "PruneIndex", "Candidates", "index_paths", "KINDS",
           "faiss_gpu_available", "Pruner", "PrunedResult", "exact_candidates", "exact_sq_distances",
           "shell_log_mass", "NeighbourCache"]
