"""Float64 oracles: every optden result is tested against these.

Written for clarity, not speed: nothing is blocked or pruned, memory is O(N M), and the
functions are meant for small problems (tests, checks). One file per family of outputs,
re-exported here so that ``from optden import reference as R; R.denoise(...)`` reads the
same for all of them:

- ``dense``: the empirical optimal denoiser D*, score, log density, posterior, nearest.
- ``local``: the local denoisers (LS, ELS, patch composite) of ``optden.LocalDenoiser``.
"""
from __future__ import annotations

from .dense import denoise, log_density, logits, nearest, posterior, score, weights
from .local import composite_denoise, equivariant_denoise, equivariant_logits, local_denoise, local_logits  # noqa: E501

__all__ = ["logits", "weights", "denoise", "score", "log_density", "posterior", "nearest"]
__all__ += ["local_logits", "local_denoise", "equivariant_logits", "equivariant_denoise", "composite_denoise"]
