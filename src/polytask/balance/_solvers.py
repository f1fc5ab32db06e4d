"""Small dense solvers for the K x K problems that gradient aggregators pose on a task Gramian.

K (the number of tasks) is small, so every problem here is solved in float64 NumPy by a dedicated
method with a known stopping rule instead of a general-purpose solver: an exact primal active-set
method for quadratic programs over the simplex or a box (MGDA, UPGrad, DualProj, CAGrad), damped
Newton for the alpha-fair conditions ``G w = w^(-1/alpha)`` (Nash-MTL, FairGrad), and an
eigendecomposition for pseudo-inverses. Nothing here needs cvxpy or scipy.optimize, and nothing
here touches autograd: inputs are detached copies.

Conventions: ``g`` is a symmetric positive semi-definite ``(K, K)`` float64 array; functions return
the weights ``w`` such that the aggregated direction is ``J^T w``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "QPResult",
    "alpha_fair",
    "box_qp",
    "cagrad_dual",
    "dual_cone_projection",
    "eig_rtol",
    "gramian_array",
    "min_norm_weights",
    "nonzero_rows",
    "psd_pinv",
    "simplex_qp",
]

# A task whose squared gradient norm is below this fraction of the largest one is treated as a zero
# row (a task without labels in the batch gives an exact zero); the norm ratio is 1e-12.
_ZERO_ROW = 1e-24
# Relative ridge that keeps the KKT systems of the simplex QPs non-singular when tasks have
# duplicate or parallel gradients; its effect on the direction is of the order of 1e-12.
_RIDGE = 1e-12


def gramian_array(gramian: torch.Tensor) -> np.ndarray:
    """A symmetrised float64 NumPy copy of a ``(K, K)`` Gramian; rejects bad shapes and NaN/inf."""
    if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(f"expected a square (K, K) Gramian, got shape {tuple(gramian.shape)}")
    g = gramian.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(g).all():
        raise FloatingPointError("the task Gramian contains NaN or inf (a task gradient is not finite)")
    return 0.5 * (g + g.T)


def eig_rtol(dtype: torch.dtype, k: int) -> float:
    """Relative eigenvalue cut-off below which a Gramian direction is numerically zero.

    ``K * eps`` of the dtype the Gramian was computed in (as in ``torch.linalg.pinv``), so float32
    Gramians, whose entries carry float32 rounding, get a float32-sized cut-off.
    """
    return max(k, 1) * torch.finfo(dtype).eps if dtype.is_floating_point else max(k, 1) * 2.2e-16


def nonzero_rows(g: np.ndarray) -> np.ndarray:
    """Boolean mask of the tasks whose gradient is not (numerically) zero."""
    d = np.clip(np.diag(g), 0.0, None)
    top = d.max() if d.size else 0.0
    return d > _ZERO_ROW * top if top > 0 else np.zeros(d.shape, dtype=bool)


def psd_pinv(g: np.ndarray, rtol: float) -> np.ndarray:
    """Pseudo-inverse of a PSD matrix, dropping eigenvalues below ``rtol * max eigenvalue``."""
    lam, v = np.linalg.eigh(g)
    top = lam.max(initial=0.0)
    if top <= 0:
        return np.zeros_like(g)
    keep = lam > rtol * top
    vk = v[:, keep]
    return (vk / lam[keep]) @ vk.T


# ---------------------------------------------------------------------------------------------
# Quadratic programs: exact primal active-set methods (Nocedal & Wright, Algorithm 16.3)
# ---------------------------------------------------------------------------------------------
@dataclass
class QPResult:
    """Solution ``x``, the iterations used and the final working set (True: at its lower bound)."""

    x: np.ndarray
    iterations: int
    bound: np.ndarray


def _solve(m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(m, rhs)
    except np.linalg.LinAlgError:  # exactly singular: the minimum-norm solution
        return np.linalg.lstsq(m, rhs, rcond=None)[0]


def box_qp(a: np.ndarray, lower: np.ndarray, max_iter: int | None = None) -> tuple[np.ndarray, int]:
    """``min 1/2 x'Ax`` subject to ``x >= l``, for every row ``l`` of ``lower`` (m, K); A positive definite.

    The m problems share A, so they run in lockstep, vectorised: each iteration solves all the
    equality-constrained subproblems in one batched ``np.linalg.solve`` (fixed coordinates get an
    identity row). Every problem starts at ``x = l``; one whose multipliers ``A l`` are non-negative (a
    task that conflicts with no other, for UPGrad) is solved there, the others first free every
    coordinate with a negative multiplier. Returns the ``(m, K)`` solutions and the lockstep iterations.
    """
    k = lower.shape[1]
    x = np.array(lower, dtype=np.float64)
    lam = x @ a
    tol = 1e-13 * float(np.abs(a).max(initial=0.0)) * max(1.0, float(np.abs(x).max(initial=0.0)))
    todo = np.flatnonzero((lam < -tol).any(axis=1))
    if todo.size == 0:
        return x, 0
    lo, bd = x[todo], lam[todo] >= -tol
    xt = lo.copy()
    eye = np.eye(k)
    it = 0
    for it in range(1, (max_iter or 4 * k + 10) + 1):  # noqa: B007  (the count is returned)
        free = ~bd
        mat = np.where(free[:, :, None] & free[:, None, :], a, eye)
        rhs = np.where(free, -((lo * bd) @ a), lo)
        try:
            target = np.linalg.solve(mat, rhs[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # singular A (reg_eps = 0 with dependent gradients)
            target = (np.linalg.pinv(mat) @ rhs[:, :, None])[:, :, 0]
        blocking = free & (target < lo)
        blocked = blocking.any(axis=1)
        if blocked.any():  # step until the first bound is hit and fix that coordinate
            r = np.flatnonzero(blocked)
            step = target[r] - xt[r]
            ratios = np.where(blocking[r], (lo[r] - xt[r]) / np.where(blocking[r], step, 1.0), np.inf)
            j = ratios.argmin(axis=1)
            xt[r] += np.clip(ratios[np.arange(r.size), j], 0.0, 1.0)[:, None] * step
            xt[r, j] = lo[r, j]
            bd[r, j] = True
        done = ~blocked
        if done.any():  # at the subproblem's minimiser: release the most negative multiplier, if any
            r = np.flatnonzero(done)
            xt[r] = target[r]
            lam = xt[r] @ a
            lam[~bd[r]] = np.inf
            j = lam.argmin(axis=1)
            release = lam[np.arange(r.size), j] < -tol
            bd[r[release], j[release]] = False
            done[r[release]] = False
            x[todo[done]] = xt[done]
            keep = ~done
            todo, lo, bd, xt = todo[keep], lo[keep], bd[keep], xt[keep]
        if todo.size == 0:
            break
    x[todo] = xt
    return x, it


def simplex_qp(
    a: np.ndarray, c: np.ndarray | None = None, free: np.ndarray | None = None, max_iter: int | None = None
) -> QPResult:
    """``min 1/2 x'Ax + c'x`` over the probability simplex (A positive definite).

    Primal active-set method: each iteration solves the KKT system of the equality-constrained
    problem on the free coordinates, steps towards its solution until a coordinate hits 0 (which is
    then fixed), or, at the solution, frees the fixed coordinate with the most negative multiplier.
    Starts at the uniform point of ``free`` (default: all coordinates), e.g. a previous solution's
    support as a warm start.
    """
    n = a.shape[0]
    c = np.zeros(n) if c is None else c
    free = np.ones(n, dtype=bool) if free is None or not free.any() else free.copy()
    x = np.where(free, 1.0 / free.sum(), 0.0)
    tol = 1e-13 * max(float(np.abs(a).max(initial=0.0)), float(np.abs(c).max(initial=0.0)), 1e-300)
    it = 0
    for it in range(1, (max_iter or 4 * n + 10) + 1):  # noqa: B007  (the count is returned)
        idx = np.flatnonzero(free)
        nf = idx.size
        kkt = np.zeros((nf + 1, nf + 1))
        kkt[:nf, :nf] = a[np.ix_(idx, idx)]
        kkt[:nf, nf] = -1.0
        kkt[nf, :nf] = 1.0
        sol = _solve(kkt, np.append(-c[idx], 1.0))
        target = np.zeros(n)
        target[idx] = sol[:nf]
        blocking = free & (target < 0)
        if blocking.any():
            b = np.flatnonzero(blocking)
            step = target - x
            ratios = -x[b] / step[b]
            j = int(np.argmin(ratios))
            x = x + min(max(float(ratios[j]), 0.0), 1.0) * step
            x[b[j]] = 0.0
            free[b[j]] = False
            continue
        x = target
        lam = a @ x + c - sol[nf]  # multipliers of the constraints x_j >= 0
        lam[free] = np.inf
        j = int(np.argmin(lam))
        if lam[j] >= -tol:
            break
        free[j] = True
    return QPResult(x, it, ~free)


def min_norm_weights(g: np.ndarray) -> tuple[np.ndarray, int]:
    """MGDA: the weights of the minimum-norm point of the convex hull of the task gradients.

    Zero rows (tasks without a gradient this step) get weight 0 and do not take part: their zero
    gradient would otherwise be the minimum-norm point and stop every other task. K = 2 uses the
    closed form of Sener & Koltun (Algorithm 1); larger K the active-set QP. Returns the weights and
    the solver iterations (0 for closed forms).
    """
    k = g.shape[0]
    rows = nonzero_rows(g)
    idx = np.flatnonzero(rows)
    w = np.zeros(k)
    if idx.size == 0:
        w[:] = 1.0 / k
        return w, 0
    if idx.size == 1:
        w[idx] = 1.0
        return w, 0
    sub = g[np.ix_(idx, idx)]
    if idx.size == 2:
        g11, g12, g22 = sub[0, 0], sub[0, 1], sub[1, 1]
        denom = g11 + g22 - 2.0 * g12
        gamma = 0.5 if denom <= _RIDGE * (g11 + g22) else min(max((g22 - g12) / denom, 0.0), 1.0)
        w[idx] = (gamma, 1.0 - gamma)
        return w, 0
    a = sub / np.trace(sub) + _RIDGE * np.eye(idx.size)
    res = simplex_qp(a)
    w[idx] = np.clip(res.x, 0.0, None)
    return w / w.sum(), res.iterations


def dual_cone_projection(
    g: np.ndarray, u: np.ndarray, reg_eps: float = 1e-4, max_iter: int | None = None
) -> tuple[np.ndarray, int]:
    """Weights of the projections of ``J^T u_r`` onto the dual cone ``{d : J d >= 0}``, per row of ``u``.

    By Proposition 1 of Quinton & Rey (2024) the projection is ``J^T v`` with
    ``v = argmin v'Gv s.t. v >= u``. As in their reference implementation, G is normalised by its
    trace and ``reg_eps * I`` is added, which makes the problem strictly convex (unique weights with
    duplicate or parallel gradients) and scale-free. Returns ``(m, K)`` weights and the iterations.
    """
    k = g.shape[0]
    t = float(np.trace(g))
    a = g / t if t > 0 else np.zeros_like(g)
    return box_qp(a + reg_eps * np.eye(k), u, max_iter=max_iter)


# ---------------------------------------------------------------------------------------------
# CAGrad: min_{w in simplex} b'w + s ||J^T w|| via a parametric simplex QP
# ---------------------------------------------------------------------------------------------
def _piece(a: np.ndarray, b: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, ...]:
    """On a fixed support, the simplex-QP solution of ``min 1/2 w'Aw + tau b'w`` is affine in tau:
    ``w = w0 + tau w1``, ``mu = mu0 + tau mu1``."""
    nf = int(free.sum())
    kkt = np.zeros((nf + 1, nf + 1))
    kkt[:nf, :nf] = a[np.ix_(free, free)]
    kkt[:nf, nf] = -1.0
    kkt[nf, :nf] = 1.0
    rhs = np.zeros((nf + 1, 2))
    rhs[nf, 0] = 1.0
    rhs[:nf, 1] = -b[free]
    sol = _solve(kkt, rhs)
    w0, w1 = np.zeros(a.shape[0]), np.zeros(a.shape[0])
    w0[free], w1[free] = sol[:nf, 0], sol[:nf, 1]
    return w0, w1, sol[nf, 0], sol[nf, 1]


def cagrad_dual(g: np.ndarray, b: np.ndarray, s: float, max_iter: int = 60) -> tuple[np.ndarray, float, int]:
    """Solve CAGrad's dual ``min_{w in simplex} b'w + s sqrt(w'Gw)`` exactly (``b = J g_0``).

    With ``tau = ||g_w|| / s`` its optimality conditions are those of the simplex QP
    ``min 1/2 w'Gw + tau b'w``, whose solution is piecewise affine in tau with ``||g_w(tau)||``
    non-decreasing; the solution is the root of ``s tau = ||g_w(tau)||``: bracketed by bisection,
    then solved exactly on the affine piece (a quadratic in tau). ``g`` should be trace-normalised.
    Returns ``w``, ``||g_w||`` and the number of simplex-QP solves.
    """
    k = g.shape[0]
    a = g + _RIDGE * np.eye(k)
    lo, hi = 0.0, 2.0 * math.sqrt(max(float(np.diag(g).max()), 0.0)) / s + 1.0
    tau = 1.0 / s  # ||g_w|| is O(1) on a trace-normalised Gramian
    free = np.zeros(k, dtype=bool)  # start at the best vertex: the linear term favours sparse solutions
    free[int(np.argmin(0.5 * np.diag(a) + tau * b))] = True
    w, rho = np.full(k, 1.0 / k), 0.0
    for n_solve in range(1, max_iter + 1):
        res = simplex_qp(a, tau * b, free=free)
        w = res.x
        free = ~res.bound
        rho = math.sqrt(max(float(w @ g @ w), 0.0))
        # Exact root on this affine piece, accepted if the support stays optimal there.
        w0, w1, mu0, mu1 = _piece(a, b, free)
        q0, q1, q2 = w0 @ g @ w0, w0 @ g @ w1, w1 @ g @ w1
        for t in _increasing_roots(s * s - q2, -2.0 * q1, -q0):
            wt = w0 + t * w1
            lam = a @ wt + t * b - (mu0 + t * mu1)
            slack = 1e-10 * (1.0 + np.abs(wt).max())
            if (wt[free] >= -slack).all() and (lam[~free] >= -slack).all():
                wt = np.clip(wt, 0.0, None)
                wt /= wt.sum()
                return wt, math.sqrt(max(float(wt @ g @ wt), 0.0)), n_solve
        if s * tau >= rho:
            hi = tau
        else:
            lo = tau
        tau = 0.5 * (lo + hi) if lo > 0 else 0.05 * hi
        if hi - lo <= 1e-15 * hi or s * hi <= 1e-8:  # converged, or ||g_w|| <= 1e-8: 0 is in the hull
            return w, rho, n_solve
    return w, rho, max_iter


def _increasing_roots(qa: float, qb: float, qc: float) -> list[float]:
    """Non-negative roots of ``qa t^2 + qb t + qc`` where the polynomial crosses upwards."""
    roots: list[float] = []
    if abs(qa) <= 1e-14 * (abs(qb) + abs(qc) + 1e-300):
        if qb > 0:
            roots.append(-qc / qb)
    else:
        disc = qb * qb - 4.0 * qa * qc
        if disc >= 0:
            sq = math.sqrt(disc)
            # numerically stable pair
            q = -0.5 * (qb + math.copysign(sq, qb)) if qb != 0 else -0.5 * sq
            cands = [q / qa, qc / q] if q != 0 else [0.0]
            roots = [t for t in cands if 2.0 * qa * t + qb >= 0]
    return sorted(t for t in roots if t >= 0)


# ---------------------------------------------------------------------------------------------
# Alpha-fair conditions: G w = w^(-p) (Nash-MTL: p = 1; FairGrad: p = 1/alpha)
# ---------------------------------------------------------------------------------------------
def alpha_fair(
    g: np.ndarray,
    p: float,
    x0: np.ndarray | None = None,
    max_iter: int = 20,
    tol: float = 1e-10,
    ridge: float = 1e-12,
) -> tuple[np.ndarray, int]:
    """Positive solution of ``(G + ridge tr(G) I) w = w^(-p)``, by damped Newton.

    It is the minimiser of the strictly convex ``1/2 w'Gw - sum_i h(w_i)`` with ``h' = w^(-p)``
    (``h = log`` for p = 1). Newton runs on ``G / tr(G)`` (the solution for G follows by scaling by
    ``tr(G)^(-1/(1+p))``), from ``x0`` (or ones) rescaled along its ray to the exact 1-D optimum. The
    small ridge keeps the problem bounded when 0 lies in the convex hull of the gradients (a
    Pareto-stationary point, where no exact solution exists): the weights are then large but finite.
    Zero rows must be removed by the caller. Returns the weights and the Newton iterations.
    """
    k = g.shape[0]
    t = float(np.trace(g))
    if not t > 0:
        raise ValueError("alpha_fair needs a Gramian with a non-zero diagonal")
    unscale = t ** (-1.0 / (1.0 + p))
    a = g / t + ridge * np.eye(k)
    u = np.ones(k) if x0 is None or x0.shape != (k,) or not (x0 > 0).all() else x0.astype(np.float64)
    x = u * (float(np.sum(u ** (1.0 - p))) / float(u @ a @ u)) ** (1.0 / (1.0 + p))

    def f(z: np.ndarray) -> float:
        h = np.log(z).sum() if p == 1.0 else float(np.sum(z ** (1.0 - p))) / (1.0 - p)
        return 0.5 * float(z @ a @ z) - h

    it = 0
    fx = f(x)
    for it in range(1, max_iter + 1):
        ax = a @ x
        xp = x ** (-p)
        if np.abs(ax / xp - 1.0).max() <= tol:
            return x * unscale, it - 1
        r = ax - xp
        dx = _solve(a + np.diag(p * xp / x), -r)
        neg = dx < 0
        step = min(1.0, 0.99 * float(np.min(-x[neg] / dx[neg]))) if neg.any() else 1.0
        slope = float(r @ dx)
        while True:
            xn = x + step * dx
            fn = f(xn)
            if fn <= fx + 1e-4 * step * slope or step < 1e-12:
                break
            step *= 0.5
        if fn >= fx - 1e-15 * abs(fx):  # no progress left at float64 precision
            return (xn if fn < fx else x) * unscale, it
        x, fx = xn, fn
    return x * unscale, it
