"""The one table of test tolerances, and the one way errors are measured against them."""
import numpy as np

# Precision contract (docs/design.md, "The precision contract"), default mode.
DENOISE_RTOL = 1e-5
LOG_DENSITY_RTOL = 1e-6
# Quantities computed with float64 arithmetic throughout (reference-vs-reference checks).
FLOAT64_RTOL = 1e-10
# The sigma range the contract covers.
SIGMAS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e3)


def rel_err(out, ref) -> float:
    """Largest per-query relative error ||out - ref|| / ||ref|| over the rows of (N, ...) arrays."""
    out = np.asarray(out, dtype=np.float64).reshape(len(ref), -1)
    ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
    return float((np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())


def scaled_norm(a, axis: int = 1) -> np.ndarray:
    """Euclidean norms along ``axis``, scaled first: numpy's squares underflow below 1e-154
    (a concentrated posterior's covariance products are 1e-240 and still exact)."""
    a = np.asarray(a, dtype=np.float64)
    m = np.abs(a).max(axis=axis, keepdims=True)
    return np.squeeze(m, axis) * np.linalg.norm(a / np.where(m > 0, m, 1.0), axis=axis)


def model_rows(ds) -> np.ndarray:
    """Every row of a Dataset in model space, (M, d) float64."""
    return ds.model_rows(np.arange(ds.M)).numpy()

# What the posterior says (issue 20; docs/design.md, section 2): ESS, entropy, top mass and
# d log p / d sigma relative (entropy against max(1, H), d log p / d sigma against
# max(|value|, d / sigma): absolute near zero); covariance matvecs and Jacobian products
# relative to ||C||_2 ||v|| (normwise).
DIAGNOSTIC_RTOL = 1e-6
COV_RTOL = 1e-5
JACOBIAN_RTOL = 1e-5


def diagnostic_scale(name: str, value, d: int, sigma):
    """The magnitude each diagnostic's error is measured against (the contract's)."""
    v = np.abs(np.asarray(value, dtype=np.float64))
    if name in ("entropy", "log_p"):
        return np.maximum(v, 1.0)
    if name == "dlogp_dsigma":
        return np.maximum(v, d / np.asarray(sigma, dtype=np.float64))
    return v
