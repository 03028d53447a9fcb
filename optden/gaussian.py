"""The closed-form denoiser of a Gaussian fitted to the data: a linear stand-in model.

If the data were Gaussian, ``N(mu, S)``, the optimal denoiser would be linear,

    D(x; sigma) = mu + S (S + sigma^2 I)^{-1} (x - mu),

and the probability-flow ODE would have the exact solution (``S = V diag(lam) V^T``)

    x(sigma') = mu + V diag(sqrt((lam + sigma'^2) / (lam + sigma^2))) V^T (x(sigma) - mu).

This is the usual "generalizing" baseline to set against the empirical optimal denoiser
(which memorizes), and a model with a closed form for testing samplers and the score
deviation.
"""
from __future__ import annotations

import numbers

import torch

from .errors import InputError
from .validate import as_tensor, check_positive_int, check_queries, check_sigma

__all__ = ["GaussianDenoiser"]


class GaussianDenoiser:
    """Linear denoiser of ``N(mu, S)``: ``D(x; sigma) = mu + S (S + sigma^2 I)^{-1} (x - mu)``.

    mean: (d,) mu; cov: (d, d) symmetric positive semi-definite S (eigenvalues below 0
    from rounding are clipped to 0). Computed in float64 on ``device``.
    image_shape: per-sample shape (default ``(d,)``), used by ``optden.sample``.
    """

    def __init__(self, mean, cov, image_shape=None, device="cpu"):
        mu = as_tensor(mean, "mean").detach().to("cpu", torch.float64).reshape(-1)
        S = as_tensor(cov, "cov").detach().to("cpu", torch.float64)
        d = mu.numel()
        if d == 0:
            raise InputError("mean: expected a non-empty vector")
        if tuple(S.shape) != (d, d):
            raise InputError(f"cov: expected shape ({d}, {d}) to match mean, got {tuple(S.shape)}")
        if not bool(torch.isfinite(mu).all()) or not bool(torch.isfinite(S).all()):
            raise InputError("mean / cov: contain NaN or inf")
        if not torch.allclose(S, S.T, rtol=1e-10, atol=1e-12 * float(S.abs().max().clamp_min(1.0))):
            raise InputError("cov: must be symmetric")
        lam, V = torch.linalg.eigh(0.5 * (S + S.T))
        self.device = torch.device(device)
        self.d = d
        self.image_shape = tuple(int(s) for s in image_shape) if image_shape is not None else (d,)
        if int(torch.tensor(self.image_shape).prod()) != d:
            raise InputError(f"image_shape: {self.image_shape} does not hold d = {d} values")
        self.mean = mu.to(self.device)
        self.eigvals = lam.clamp_min(0.0).to(self.device)  # (d,)
        self.eigvecs = V.to(self.device)  # (d, d), columns
        self.cov = (self.eigvecs * self.eigvals) @ self.eigvecs.T

    @classmethod
    def fit(cls, data, image_shape=None, device="cpu", shrinkage: float = 0.0) -> "GaussianDenoiser":
        """Fit mu and S (maximum likelihood, divisor M) to the rows of a Dataset or an (M, ...) array.

        A Dataset is read in model space, block by block; its image_shape is kept.
        shrinkage: optional ``S <- (1 - a) S + a tr(S)/d I``, a in [0, 1].
        """
        from .data import Dataset

        if isinstance(shrinkage, bool) or not isinstance(shrinkage, numbers.Real) or not 0 <= shrinkage <= 1:
            raise InputError(f"shrinkage: expected a number in [0, 1], got {shrinkage!r}")
        if isinstance(data, Dataset):
            d, M = data.d, data.M
            s1 = torch.zeros(d, dtype=torch.float64)
            s2 = torch.zeros(d, d, dtype=torch.float64)
            step = max(1, min(M, (16 << 20) // (8 * d)))
            for a in range(0, M, step):
                rows = data.model_rows(torch.arange(a, min(M, a + step)).numpy())
                s1 += rows.sum(0)
                s2 += rows.T @ rows
            mu = s1 / M
            S = s2 / M - torch.outer(mu, mu)
            shape = data.image_shape if image_shape is None else image_shape
        else:
            t = as_tensor(data, "data").detach().to("cpu", torch.float64)
            if t.dim() < 2 or t.shape[0] < 1:
                raise InputError(f"data: expected (M, ...) rows, got shape {tuple(t.shape)}")
            x = t.reshape(t.shape[0], -1)
            mu = x.mean(0)
            xc = x - mu
            S = xc.T @ xc / x.shape[0]
            shape = tuple(t.shape[1:]) if image_shape is None else image_shape
        S = 0.5 * (S + S.T)
        if shrinkage > 0:
            S = (1 - shrinkage) * S + shrinkage * torch.trace(S) / S.shape[0] * torch.eye(S.shape[0], dtype=S.dtype)
        return cls(mu, S, image_shape=shape, device=device)

    def _flat(self, x, name="x") -> tuple[torch.Tensor, torch.Tensor]:
        t = check_queries(x, self.d, name)
        return t, t.reshape(t.shape[0], self.d).to(self.device, torch.float64)

    def __call__(self, x, sigma) -> torch.Tensor:
        """D(x; sigma) for x (B, *shape), sigma a scalar or (B,): same shape as x, float64."""
        t, u = self._flat(x)
        sig = check_sigma(sigma, u.shape[0]).to(self.device)
        c = (u - self.mean) @ self.eigvecs  # (B, d) in the eigenbasis
        gain = self.eigvals / (self.eigvals + sig[:, None] ** 2)
        return (self.mean + (gain * c) @ self.eigvecs.T).reshape(t.shape)

    def score(self, x, sigma) -> torch.Tensor:
        """(D(x; sigma) - x) / sigma^2: same shape as x, float64."""
        t, u = self._flat(x)
        sig = check_sigma(sigma, u.shape[0]).to(self.device)
        return ((self(u, sig) - u) / sig[:, None] ** 2).reshape(t.shape)

    def ode_solution(self, x, sigma_from, sigma_to) -> torch.Tensor:
        """Exact PF-ODE flow from sigma_from to sigma_to >= 0 (VE): same shape as x, float64.

        ``x(sigma_to) = mu + V diag(sqrt((lam + sigma_to^2) / (lam + sigma_from^2))) V^T (x - mu)``.
        """
        t, u = self._flat(x)
        s0 = check_sigma(sigma_from, u.shape[0], "sigma_from").to(self.device)
        s1 = check_sigma(sigma_to, u.shape[0], "sigma_to", allow_zero=True).to(self.device)
        c = (u - self.mean) @ self.eigvecs
        ratio = torch.sqrt((self.eigvals + s1[:, None] ** 2) / (self.eigvals + s0[:, None] ** 2))
        return (self.mean + (ratio * c) @ self.eigvecs.T).reshape(t.shape)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """n exact draws of N(mu, S): (n, *image_shape) float64 on the CPU."""
        n = check_positive_int(n, "n")
        g = torch.Generator().manual_seed(int(seed))
        z = torch.randn((n, self.d), generator=g, dtype=torch.float64)
        x = self.mean.cpu() + (z * self.eigvals.cpu().sqrt()) @ self.eigvecs.cpu().T
        return x.reshape(n, *self.image_shape)

    def __repr__(self) -> str:
        return f"GaussianDenoiser(d={self.d}, image_shape={self.image_shape}, device={self.device})"
