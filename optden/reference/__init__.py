"""Float64 oracles: every optden result is tested against these.

Written for clarity, not speed: nothing is blocked or pruned, memory is O(N M), and the
functions are meant for small problems (tests, checks). One file per family of outputs,
re-exported here so that ``from optden import reference as R; R.denoise(...)`` reads the
same for all of them:

- ``dense``: the empirical optimal denoiser D*, score, log density, posterior, nearest.
- ``mp``: the same in arbitrary precision (mpmath), for where float64 itself is in doubt
  (imported as ``optden.reference.mp``; mpmath is a test dependency).
- ``moments``: what the posterior says (named so that ``posterior``, dense's top weights,
  keeps its name): diagnostics (ESS, entropy, top mass, d log p / d sigma), covariance,
  the derivatives of D*, the score and the log density.
- ``local``: the local denoisers (LS, ELS, patch composite) of ``optden.LocalDenoiser``.
"""
from __future__ import annotations

from .dense import denoise, log_density, logits, nearest, posterior, score, weights
from .local import composite_denoise, equivariant_denoise, equivariant_logits, local_denoise, local_logits  # noqa: E501
from .moments import denoiser_dsigma, denoiser_jacobian, diagnostics, log_density_dsigma, posterior_cov, score_jacobian

__all__ = ["logits", "weights", "denoise", "score", "log_density", "posterior", "nearest",
           "diagnostics", "posterior_cov", "denoiser_jacobian", "denoiser_dsigma", "log_density_dsigma",
           "score_jacobian"]
__all__ += ["local_logits", "local_denoise", "equivariant_logits", "equivariant_denoise", "composite_denoise"]
