"""A differentiable D*: ``OptimalDenoiser`` inside torch's autograd, with exact derivatives.

The derivatives of the empirical optimal denoiser are posterior moments (docs/design.md,
section 1): with C = Cov[y | u] and x_i = l_top - l_i the logit gaps,

    dD*/du      = C / sigma^2                      (symmetric: J^T g = J g)
    dD*/dsigma  = (2 / sigma) Cov_w(y, x) = sum w (y - D)(||u - y||^2 - E ||u - y||^2) / sigma^3
    d log p / du = (D* - u) / sigma^2 (the score),   d log p / dsigma = (2 A - d) / sigma

so backward (a vector-Jacobian product) and jvp (forward mode) are one certified pass
of ``optden.posterior.PosteriorCov`` (built once per forward, at the first product),
batched over the vectors. ``torch.autograd.grad``, ``torch.autograd.functional.jacobian``
/ ``jvp``, forward-mode AD and ``torch.func`` (``grad``, ``vjp``, ``jvp``, ``jacrev``,
``jacfwd``, ``vmap``) work through ``setup_context`` and ``vmap`` staticmethods (a vmap
over the vectors of a product becomes the product's batch of vectors). The score,
``(D* - u) / sigma^2``, is differentiable through D*; the log density has its own
Function whose backward is the score. Second derivatives of D* (the third posterior
moment) are not implemented: their entries come back NaN.

A query that takes no part in autograd (no ``requires_grad``, no tangent, no
``torch.func`` transform) never reaches this module: ``needs_autograd`` is the test the
denoiser's methods make before their usual path.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad

__all__ = ["needs_autograd", "denoise", "log_density"]


# torch.func's wrapped tensors (vmap, grad, jvp levels): torch has no public test for them
_is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor",  # private: as said
                                lambda t: False)


def needs_autograd(*values) -> bool:
    """Whether any of the tensors among ``values`` takes part in autograd: reverse mode
    (``requires_grad`` with grad enabled), forward mode (a dual tensor's tangent) or a
    ``torch.func`` transform (a functorch-wrapped tensor)."""
    for t in values:
        if not isinstance(t, torch.Tensor):
            continue
        if t.requires_grad and torch.is_grad_enabled():
            return True
        if _is_functorch_wrapped(t):
            return True
        if forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def _has_tangent(t: torch.Tensor) -> bool:
    return forward_ad.unpack_dual(t).tangent is not None


class _Ops:
    """What the Functions need from the denoiser, as closures over validated inputs:
    ``forward(u, sigma) -> D (N, d)``, ``cov(u, sigma) -> PosteriorCov``,
    ``diagnose(u, sigma) -> Diagnostics``; u (N, d) float64 model space, sigma (N,)."""

    def __init__(self, forward, cov, diagnose=None):
        self.forward, self.cov, self.diagnose = forward, cov, diagnose
        self.last = self.diag = self.holder = None  # the plain inputs (diagnostics, products) of the latest forward
        self.eager = False  # build the covariance in forward (forward-mode AD reads it in jvp)


class _Products(torch.autograd.Function):
    """(grad_u (N, d), grad_sigma (N,)) = (C g / sigma^2, g . dD*/dsigma) for g (N, d):
    the vector-Jacobian product of D* at (u, sigma). It is linear in g, so its own
    derivative in g is exact (what ``torch.autograd.functional.jvp``'s double-backward
    needs); its derivatives in u and sigma (second derivatives of D*, the third posterior
    moment) are not implemented and come back NaN. Its vmap rule folds a
    vmapped g into the product's vectors (one pass for all of them)."""

    @staticmethod
    def forward(g, u, sigma, holder):
        cv, t, _, _ = holder.get().products(g.detach()[:, :, None])
        return cv[..., 0] / holder.sigma[:, None] ** 2, t[:, 0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.holder = inputs[3]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, h_u, h_s):
        # the product is linear in g: its derivative is the Jacobian itself (J symmetric)
        grad_g = _jacobian_product(ctx.holder, None if h_u is None else h_u.detach(), h_s)
        n, d = grad_g.shape
        dev = grad_g.device
        # not a warning: torch.autograd.functional.jvp's double backward asks for these
        # without using them; a second derivative that does use them shows NaN
        nan_u = torch.full((n, d), torch.nan, dtype=torch.float64, device=dev) if ctx.needs_input_grad[1] else None
        nan_s = torch.full((n,), torch.nan, dtype=torch.float64, device=dev) if ctx.needs_input_grad[2] else None
        return grad_g, nan_u, nan_s, None

    @staticmethod
    def vmap(info, in_dims, g, u, sigma, holder):
        if in_dims[1] is not None or in_dims[2] is not None:
            raise NotImplementedError("vmap over the queries inside a product of D*'s derivatives is not supported")
        G = g.movedim(in_dims[0], -1)  # (N, d, B)
        cv, t, _, _ = holder.get().products(G)
        return (cv.movedim(-1, 0) / holder.sigma[:, None] ** 2, t.movedim(-1, 0)), (0, 0)


def _jacobian_product(holder, u_t, sigma_t) -> torch.Tensor:
    """J u_t + (dD*/dsigma) sigma_t (N, d) at the holder's (u, sigma): C u_t / sigma^2 and
    (2 / sigma) Cov_w(y, x) sigma_t, from one pass (either may be None: 0)."""
    cov, sig = holder.get(), holder.sigma
    n, d = cov.denoised.shape
    vec = torch.zeros(n, d, 1, dtype=torch.float64, device=cov.device) if u_t is None else u_t[:, :, None]
    cv, _, dsig, _ = cov.products(vec)
    out = cv[..., 0] / sig[:, None] ** 2
    return out if sigma_t is None else out + dsig * sigma_t[:, None]


def _save(ctx, inputs):
    """setup_context's common part: keep (u, sigma) for backward; returns the ops."""
    u, sigma, ops = inputs
    ctx.ops = ops
    ctx.save_for_backward(u, sigma)
    ctx.set_materialize_grads(False)
    return ops


class _Holder:
    """The PosteriorCov of one forward's (u, sigma), built at the first product."""

    def __init__(self, ops, u, sigma):
        self.ops, self.u, self.sigma, self.cov = ops, u, sigma, None

    def get(self):
        if self.cov is None:
            self.cov = self.ops.cov(self.u, self.sigma)
        return self.cov


def _fold(info, in_dims, u, sigma):
    """A vmap over (u (N, d), sigma (N,)) as one call: (U (B N, d), S (B N,), B, N)."""
    B = info.batch_size
    U = u.movedim(in_dims[0], 0) if in_dims[0] is not None else u.expand(B, *u.shape)
    S = sigma.movedim(in_dims[1], 0) if in_dims[1] is not None else sigma.expand(B, *sigma.shape)
    return U.reshape(B * U.shape[1], U.shape[2]), S.reshape(-1), B, U.shape[1]


class _Denoise(torch.autograd.Function):
    """D*(u; sigma) for u (N, d) float64 model-space queries and sigma (N,) float64."""

    @staticmethod
    def forward(u, sigma, ops):
        # forward sees the values below every autograd / functorch layer (the only place their
        # data can be read inside a torch.func transform): keep them, and the covariance when
        # forward mode will need it
        ops.last = (u.detach(), sigma.detach())
        with torch.no_grad():
            out = ops.forward(*ops.last)
            ops.holder = _Holder(ops, *ops.last)
            if ops.eager:
                ops.holder.get()
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.holder = _save(ctx, inputs).holder

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None
        u, sigma = ctx.saved_tensors
        gu, gs = _Products.apply(g, u, sigma, ctx.holder)
        return gu, gs, None

    @staticmethod
    def jvp(ctx, u_t, sigma_t, _ops):
        return _jacobian_product(ctx.holder, u_t, sigma_t)

    @staticmethod
    def vmap(info, in_dims, u, sigma, ops):
        U, S, B, n = _fold(info, in_dims, u, sigma)
        return _Denoise.apply(U, S, ops).reshape(B, n, -1), 0


class _LogDensity(torch.autograd.Function):
    """log p_sigma(u) (N,) from the diagnostics pass; backward: the score and (2 A - d) / sigma."""

    @staticmethod
    def forward(u, sigma, ops):
        ops.last = (u.detach(), sigma.detach())
        with torch.no_grad():
            ops.diag = ops.diagnose(*ops.last)
            return ops.diag.log_p

    @staticmethod
    def setup_context(ctx, inputs, output):
        ops = _save(ctx, inputs)
        ctx.plain, ctx.diag = ops.last, ops.diag

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None
        u, sigma = ctx.saved_tensors
        dlogp = ctx.diag.dlogp_dsigma
        # create_graph: the score differentiable through D* (Hessians of log p); else the pass's D*
        D = _Denoise.apply(u, sigma, ctx.ops) if torch.is_grad_enabled() else ctx.diag.denoised
        score = (D - u) / sigma[:, None] ** 2
        return g[:, None] * score, g * dlogp, None

    @staticmethod
    def jvp(ctx, u_t, sigma_t, _ops):
        diag = ctx.diag
        out = torch.zeros_like(diag.dlogp_dsigma)
        if u_t is not None:
            pu, ps = ctx.plain
            out = out + (((diag.denoised - pu) / ps[:, None] ** 2) * u_t).sum(1)
        if sigma_t is not None:
            out = out + diag.dlogp_dsigma * sigma_t
        return out

    @staticmethod
    def vmap(info, in_dims, u, sigma, ops):
        U, S, B, n = _fold(info, in_dims, u, sigma)
        return _LogDensity.apply(U, S, ops).reshape(B, n), 0


def _sigma_tensor(sigma, n: int, like: torch.Tensor) -> torch.Tensor:
    """sigma (a number or a tensor of 1 or n values, possibly tracking gradients) as (n,) float64."""
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(like.device, torch.float64).reshape(-1)
        return s.expand(n) if s.shape[0] == 1 else s
    return torch.full((n,), float(sigma), dtype=torch.float64, device=like.device)


def denoise(u: torch.Tensor, sigma, forward, cov) -> torch.Tensor:
    """D*(u; sigma) (N, d) inside autograd: u (N, d) model-space queries (any float dtype,
    computed in float64), sigma a number or a tensor of 1 or N values; forward(u, sigma)
    and cov(u, sigma) are the denoiser's certified D* and ``PosteriorCov`` of validated
    float64 inputs."""
    u64 = u.to(torch.float64)
    sig = _sigma_tensor(sigma, u64.shape[0], u64)
    ops = _Ops(forward, cov)
    ops.eager = _has_tangent(u64) or _has_tangent(sig)
    return _Denoise.apply(u64, sig, ops)


def log_density(u: torch.Tensor, sigma, forward, cov, diagnose) -> torch.Tensor:
    """log p_sigma(u) (N,) inside autograd (see ``denoise``); diagnose(u, sigma) gives the
    denoiser's ``Diagnostics`` (D*, log p and d log p / d sigma from one pass)."""
    u64 = u.to(torch.float64)
    return _LogDensity.apply(u64, _sigma_tensor(sigma, u64.shape[0], u64), _Ops(forward, cov, diagnose))
