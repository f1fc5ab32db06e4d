"""Gradient-level balancers (aggregators): reference values from torchjd, defining properties, engine."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from engine_helpers import TASKS, tiny_step
from polytask.balance import BALANCERS, GradientEngine, NoSharedParametersError, build_balancer
from polytask.balance._solvers import alpha_fair, box_qp, cagrad_dual
from polytask.balance.aligned_mtl import aligned_mtl_weights
from polytask.balance.cagrad import cagrad_weights
from polytask.balance.config import config_weights
from polytask.balance.dualproj import dualproj_weights
from polytask.balance.fairgrad import fairgrad_weights
from polytask.balance.graddrop import graddrop_direction
from polytask.balance.gradvac import gradvac_weights
from polytask.balance.imtl_g import imtl_g_weights
from polytask.balance.mgda import mgda_weights
from polytask.balance.nash_mtl import nash_mtl_weights
from polytask.balance.pcgrad import pcgrad_weights
from polytask.balance.upgrad import upgrad_weights

DTYPES = [torch.float64, torch.float32]
# Agreement with the reference: |d - d_ref| <= TOL * (1 + |d_ref|), max norm.
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
# Slack for inequalities that hold exactly in exact arithmetic.
EPS = {torch.float64: 1e-9, torch.float32: 1e-4}

MINE = ["aligned-mtl", "cagrad", "config", "dualproj", "fairgrad", "graddrop", "gradvac", "imtl-g", "mgda"]
MINE += ["mgda-ub", "nash-mtl", "pcgrad", "upgrad"]
WEIGHT_PATH = [n for n in MINE if n != "graddrop"]


# ------------------------------------------------------------------------------------------ inputs
def _jacobians(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random and adversarial Jacobians (K, P), entries O(1)."""
    g = torch.Generator().manual_seed(0)

    def rnd(k: int, p: int = 12) -> torch.Tensor:
        return torch.randn(k, p, generator=g, dtype=torch.float64)

    base, other = rnd(1), rnd(2)
    zero = rnd(4)
    zero[2] = 0.0
    cases = {
        "random2": rnd(2),
        "random3": rnd(3),
        "random5": rnd(5),
        "random5b": rnd(5) + 1.5 * rnd(1),  # mostly aligned
        "conflicting": torch.tensor([[1.0, 0.3, 0.0], [-0.6, 1.0, 0.1], [0.3, -0.4, 1.0]], dtype=torch.float64),
        "parallel": torch.cat([base, 2.0 * base, other[:1]]),
        "duplicate": torch.cat([base, base, other]),
        "zero-row": zero,
        "k1": rnd(1),
    }
    return {k: v.to(dtype) for k, v in cases.items()}


DEGENERATE = {
    "opposite": torch.tensor([[1.0, 2.0, 0.0], [-1.0, -2.0, 0.0], [0.5, 0.0, 1.0]]),
    "all-zero": torch.zeros(3, 4),
    "wide": torch.randn(6, 2, generator=torch.Generator().manual_seed(3)),  # 0 inside the hull
    "tiny": 1e-6 * torch.randn(3, 5, generator=torch.Generator().manual_seed(4)),
    "k1-zero": torch.zeros(1, 3),
}


def _close(d: torch.Tensor, ref: torch.Tensor, tol: float) -> float:
    err = float((d.double() - ref.double()).abs().max() / (1.0 + ref.double().abs().max()))
    assert err <= tol, f"max relative error {err:.2e} > {tol:.0e}"
    return err


def _dir(fn: Callable[..., torch.Tensor], j: torch.Tensor, *args: object) -> torch.Tensor:
    return fn(j @ j.T, *args) @ j


# ----------------------------------------------------------------------------- torchjd reference
@pytest.fixture(scope="module")
def tjd():  # type: ignore[no-untyped-def]
    return pytest.importorskip("torchjd.aggregation")


_EXACT = {  # same direction as torchjd 0.18 on every case (needs torchjd's quadprog extra for UPGrad/DualProj)
    "upgrad": (lambda a: a.UPGrad(), upgrad_weights),
    "dualproj": (lambda a: a.DualProj(), dualproj_weights),
    "imtl-g": (lambda a: a.IMTLG(), imtl_g_weights),
    "aligned-mtl": (lambda a: a.AlignedMTL(), aligned_mtl_weights),
    "config": (lambda a: a.ConFIG(), config_weights),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(_EXACT))
def test_matches_torchjd(tjd, method: str, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    if method in ("upgrad", "dualproj"):
        pytest.importorskip("quadprog")
        pytest.importorskip("qpsolvers")
    make, fn = _EXACT[method]
    for name, j in {**_jacobians(dtype), **{k: v.to(dtype) for k, v in DEGENERATE.items() if k != "tiny"}}.items():
        if method in ("upgrad", "dualproj") and name == "all-zero":
            continue  # torchjd's absolute norm_eps: a zero Gramian gives the mean (0 here too)
        ref = make(tjd)(j)
        _close(_dir(fn, j), ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_pcgrad_and_graddrop_match_torchjd_under_the_same_draws(tjd, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    for j in _jacobians(dtype).values():
        for seed in range(3):
            torch.manual_seed(seed)
            ref = tjd.PCGrad()(j)
            torch.manual_seed(seed)
            _close(_dir(pcgrad_weights, j), ref, TOL[dtype])
            torch.manual_seed(seed)
            ref = tjd.GradDrop()(j)
            torch.manual_seed(seed)
            _close(graddrop_direction(j), ref, TOL[dtype])
            torch.manual_seed(seed)
            leak = torch.linspace(0.1, 0.6, j.shape[0], dtype=dtype)
            ref = tjd.GradDrop(leak=leak)(j)
            torch.manual_seed(seed)
            _close(graddrop_direction(j, leak), ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradvac_matches_torchjd_over_several_steps(tjd, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    for j in _jacobians(dtype).values():
        k = j.shape[0]
        ref_agg = tjd.GradVac(beta=0.3)
        targets = torch.zeros(k, k, dtype=torch.float64)
        for step in range(4):
            jt = j * (1.0 + 0.5 * step) + 0.2 * step * torch.roll(j, 1, dims=1)
            torch.manual_seed(step)
            ref = ref_agg(jt)
            torch.manual_seed(step)
            w, targets = gradvac_weights(jt @ jt.T, targets, 0.3)
            _close(w @ jt, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mgda_matches_torchjd(tjd, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """torchjd runs Frank-Wolfe: exact for K = 2 (one exact line search), approximate beyond, where we
    compare loosely and check exactness by the KKT conditions (test_mgda_is_the_min_norm_point)."""
    for name, j in _jacobians(dtype).items():
        ref_j = j[j.abs().sum(dim=1) > 0]  # our MGDA leaves zero rows out of the hull
        ref = tjd.MGDA(epsilon=1e-12, max_iters=3000)(ref_j)
        tol = TOL[dtype] if ref_j.shape[0] <= 2 else 2e-3
        _close(_dir(mgda_weights, j), ref, tol)
        if name == "zero-row":
            _close(_dir(mgda_weights, j), _dir(mgda_weights, ref_j), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fairgrad_matches_torchjd(tjd, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("scipy")
    for name, j in _jacobians(dtype).items():
        if name in ("parallel", "duplicate"):
            continue  # many exact solutions for the weights (same direction); least_squares stops early
        ref_j = j[j.abs().sum(dim=1) > 0]  # zero rows get weight 0 here, an unbounded one in scipy
        for alpha in (0.5, 1.0, 2.0):
            ref = tjd.FairGrad(alpha=alpha)(ref_j.double()).to(dtype)
            _close(_dir(fairgrad_weights, j, alpha), ref, TOL[dtype])


@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
@pytest.mark.parametrize("dtype", DTYPES)
def test_nash_mtl_matches_torchjd_where_it_converged(tjd, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """torchjd's Nash-MTL (the official convex-concave iterations with ECOS) fails on some inputs (K = 1
    raises; some random K = 8 Gramians end with residuals of O(10)); compare where it solved the
    condition ``G alpha = 1 / alpha``."""
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    compared = 0
    for name, j in _jacobians(torch.float64).items():
        ref_j = j[j.abs().sum(dim=1) > 0]
        if ref_j.shape[0] < 2 or name in ("parallel", "duplicate"):
            continue
        alpha = tjd.NashMTL(n_tasks=ref_j.shape[0], max_norm=0.0).weighting(ref_j)
        g = ref_j @ ref_j.T
        if float((g @ alpha * alpha - 1).abs().max()) > 1e-4:
            continue
        compared += 1
        j = j.to(dtype)
        _close(_dir(nash_mtl_weights, j), (alpha @ ref_j).to(dtype), TOL[dtype])
    assert compared >= 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_matches_torchjd(tjd, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    """torchjd solves the dual with cvxpy/Clarabel, whose weights are accurate to ~1e-4; ours is exact
    (KKT to 1e-8 in test_cagrad_dual_is_optimal), so the directions agree to 1e-3."""
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    for name, j in _jacobians(dtype).items():
        if name == "zero-row":
            continue  # tasks without gradient take no part in our worst case (test_cagrad_...zero_rows)
        for c in (0.4, 0.8):
            ref = tjd.CAGrad(c=c)(j)
            _close(_dir(cagrad_weights, j, c, 0), ref, 1e-3)


# --------------------------------------------------------------------------- defining properties
def _random_j(dtype: torch.dtype, k: int = 4, p: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, p, generator=g, dtype=torch.float64) + 0.3 * torch.randn(1, p, generator=g)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mgda_is_the_min_norm_point(dtype: torch.dtype) -> None:
    for seed in range(5):
        for k in (2, 3, 6):
            j = _random_j(dtype, k, 8 if seed % 2 else 3, seed)
            g = (j @ j.T).double()
            w = mgda_weights(j @ j.T).double()
            assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-6
            gw = g @ w
            norm2 = float(w @ gw)
            scale = float(g.diagonal().max())
            assert (gw >= norm2 - EPS[dtype] * scale).all()  # KKT: g_i . d >= ||d||^2 ...
            assert ((gw - norm2).abs()[w > 1e-6] <= EPS[dtype] * 10 * scale).all()  # ... with equality on the support
    g1, g2 = torch.tensor([1.0, 0.0], dtype=dtype), torch.tensor([0.0, 2.0], dtype=dtype)
    j = torch.stack([g1, g2])
    gamma = float((g2 @ (g2 - g1)) / (g1 - g2).square().sum())  # the K = 2 closed form
    assert mgda_weights(j @ j.T).tolist() == pytest.approx([gamma, 1 - gamma])


@pytest.mark.parametrize("dtype", DTYPES)
def test_pcgrad_two_tasks_closed_form_and_no_conflict(dtype: torch.dtype) -> None:
    for seed in range(5):
        j = _random_j(dtype, 2, 6, seed)
        g1, g2 = j.double()
        d = _dir(pcgrad_weights, j).double()
        if float(g1 @ g2) < 0:
            ref = (g1 - (g1 @ g2) / (g2 @ g2) * g2) + (g2 - (g1 @ g2) / (g1 @ g1) * g1)
            assert float(d @ g1) >= -EPS[dtype] and float(d @ g2) >= -EPS[dtype]
        else:
            ref = g1 + g2
        _close(d, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_upgrad_non_conflicting_and_permutation_invariant(dtype: torch.dtype) -> None:
    for seed in range(5):
        j = _random_j(dtype, 5, 8, seed)
        jd = j.double()
        scale = float((jd**2).sum())
        # exactly non-conflicting without the ridge; with the default reg_eps, J d >= -reg_eps tr(G) |w|
        assert (jd @ _dir(upgrad_weights, j, 0.0).double() >= -EPS[dtype] * scale).all()
        w = upgrad_weights(j @ j.T)
        assert (jd @ (w.double() @ jd) >= -(1e-4 * float(w.abs().max()) + EPS[dtype]) * scale).all()
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        _close(_dir(upgrad_weights, j[perm]), w @ j, TOL[dtype])
        _close(upgrad_weights(j[perm] @ j[perm].T), w[perm], TOL[dtype])  # equivariant weights
    j = torch.tensor([[1.0, 0.2, 0.0], [0.3, 1.0, 0.0], [0.0, 0.1, 2.0]], dtype=dtype)  # no conflict
    _close(_dir(upgrad_weights, j), j.mean(dim=0), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dualproj_non_conflicting(dtype: torch.dtype) -> None:
    for seed in range(5):
        j = _random_j(dtype, 5, 8, seed)
        jd = j.double()
        scale = float((jd**2).sum())
        assert (jd @ _dir(dualproj_weights, j, 0.0).double() >= -EPS[dtype] * scale).all()
        w = dualproj_weights(j @ j.T)
        assert (jd @ (w.double() @ jd) >= -(1e-4 * float(w.abs().max()) + EPS[dtype]) * scale).all()
    j = torch.tensor([[1.0, 0.2], [0.3, 1.0]], dtype=dtype)
    _close(_dir(dualproj_weights, j), j.mean(dim=0), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_imtl_g_equal_projections(dtype: torch.dtype) -> None:
    for seed in range(5):
        j = _random_j(dtype, 4, 9, seed)
        w = imtl_g_weights(j @ j.T)
        assert abs(float(w.sum()) - 1) < TOL[dtype]
        proj = (j.double() @ (w.double() @ j.double())) / j.double().norm(dim=1)
        _close(proj, proj.mean().expand(4), 10 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cagrad_c0_is_the_mean_and_improves_the_worst_task(dtype: torch.dtype) -> None:
    for seed in range(5):
        j = _random_j(dtype, 4, 6, seed)
        _close(_dir(cagrad_weights, j, 0.0), j.mean(dim=0), TOL[dtype])
        g0 = j.double().mean(dim=0)
        for c in (0.2, 0.5, 0.9):
            d = _dir(cagrad_weights, j, c, 0).double()
            assert float((d - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-5) + EPS[dtype]  # in the ball
            worst = float((j.double() @ d).min())
            assert worst >= float((j.double() @ g0).min()) - EPS[dtype] * 10  # at least the mean's worst
        d1 = _dir(cagrad_weights, j, 0.4, 1)
        _close(d1, _dir(cagrad_weights, j, 0.4, 0) / (1 + 0.4**2), TOL[dtype])  # official rescale


def test_cagrad_dual_is_optimal() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        k = int(rng.integers(2, 9))
        jj = rng.standard_normal((k, int(rng.integers(2, 12)))) + rng.standard_normal((1, 1))
        g = jj @ jj.T
        g /= np.trace(g)
        b, s = g.mean(axis=1), float(rng.choice([0.2, 0.4, 0.9])) * math.sqrt(g.mean())
        w, rho, n = cagrad_dual(g, b, s)
        if rho <= 1e-7:
            continue
        grad = b + s * (g @ w) / rho  # KKT of min_{simplex} b'w + s ||J^T w||
        mu = float(w @ grad)
        assert grad.min() >= mu - 1e-8 and np.abs(grad - mu)[w > 1e-9].max() <= 1e-8 and n <= 20


@pytest.mark.parametrize("dtype", DTYPES)
def test_nash_mtl_solves_the_bargaining_condition(dtype: torch.dtype) -> None:
    for seed in range(5):
        j = _random_j(dtype, 4, 8, seed)
        g = (j @ j.T).double()
        w = nash_mtl_weights(j @ j.T).double()
        _close(g @ w, 1.0 / w, 10 * TOL[dtype])
        assert float(w @ g @ w) == pytest.approx(4.0, rel=10 * TOL[dtype])  # ||d||^2 = K


@pytest.mark.parametrize("dtype", DTYPES)
def test_fairgrad_solves_its_condition(dtype: torch.dtype) -> None:
    for seed in range(3):
        j = _random_j(dtype, 4, 8, seed)
        g = (j @ j.T).double()
        for alpha in (0.5, 1.0, 3.0):
            w = fairgrad_weights(j @ j.T, alpha).double()
            _close(g @ w, w ** (-1.0 / alpha), 10 * TOL[dtype])
        assert fairgrad_weights(j @ j.T, 0.0).tolist() == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_config_equal_positive_cosines(dtype: torch.dtype) -> None:
    for seed in range(5):
        j = _random_j(dtype, 4, 9, seed)
        d = _dir(config_weights, j).double()
        cos = (j.double() @ d) / (j.double().norm(dim=1) * d.norm())
        assert (cos > 0).all()
        _close(cos, cos.mean().expand(4), 10 * TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_mtl_equalises_orthogonal_gradients(dtype: torch.dtype) -> None:
    j = torch.diag(torch.tensor([1.0, 3.0, 0.5], dtype=dtype))
    d = _dir(aligned_mtl_weights, j)  # every task scaled to the smallest singular value, 0.5
    _close(d, torch.full((3,), 0.5 / 3, dtype=dtype), TOL[dtype])


_HOMOGENEOUS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "upgrad": upgrad_weights,
    "dualproj": dualproj_weights,
    "mgda": mgda_weights,
    "imtl-g": imtl_g_weights,
    "cagrad": cagrad_weights,
    "aligned-mtl": aligned_mtl_weights,
    "config": config_weights,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", sorted(_HOMOGENEOUS))
def test_scale_and_permutation_behaviour(method: str, dtype: torch.dtype) -> None:
    fn = _HOMOGENEOUS[method]
    j = _random_j(dtype, 4, 7, 1)
    d = _dir(fn, j)
    for a in (1e-3, 7.0):
        _close(_dir(fn, a * j), a * d, TOL[dtype])  # linear homogeneity
    perm = torch.tensor([2, 0, 3, 1])
    _close(fn(j[perm] @ j[perm].T), fn(j @ j.T)[perm], TOL[dtype])  # equivariant weights


@pytest.mark.parametrize("dtype", DTYPES)
def test_nash_and_fairgrad_scale_behaviour(dtype: torch.dtype) -> None:
    j = _random_j(dtype, 3, 7, 2)
    _close(_dir(nash_mtl_weights, 5.0 * j), _dir(nash_mtl_weights, j), TOL[dtype])  # ||d||^2 = K: scale-free
    for alpha in (0.5, 2.0):  # G w = w^(-1/alpha): d(aJ) = a^((1 - alpha) / (1 + alpha)) d(J)
        ref = 5.0 ** ((1 - alpha) / (1 + alpha)) * _dir(fairgrad_weights, j, alpha)
        _close(_dir(fairgrad_weights, 5.0 * j, alpha), ref, TOL[dtype])
    perm = torch.tensor([1, 2, 0])
    _close(nash_mtl_weights(j[perm] @ j[perm].T), nash_mtl_weights(j @ j.T)[perm], TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_randomised_methods_are_reproducible_and_homogeneous(dtype: torch.dtype) -> None:
    j = _random_j(dtype, 5, 7, 3)
    for fn in (lambda m: _dir(pcgrad_weights, m), graddrop_direction):
        torch.manual_seed(7)
        d = fn(j)
        torch.manual_seed(7)
        _close(fn(j), d, 0.0)
        torch.manual_seed(7)
        _close(fn(3.0 * j), 3.0 * d, TOL[dtype])


def _all_weights(g: torch.Tensor) -> dict[str, torch.Tensor]:
    k = g.shape[0]
    torch.manual_seed(0)
    return {
        "upgrad": upgrad_weights(g),
        "dualproj": dualproj_weights(g),
        "mgda": mgda_weights(g),
        "pcgrad": pcgrad_weights(g),
        "gradvac": gradvac_weights(g, torch.full((k, k), 0.3, dtype=torch.float64), 0.5)[0],
        "imtl-g": imtl_g_weights(g),
        "cagrad": cagrad_weights(g),
        "nash-mtl": nash_mtl_weights(g),
        "aligned-mtl": aligned_mtl_weights(g),
        "config": config_weights(g),
        "fairgrad": fairgrad_weights(g),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted([*DEGENERATE, "zero-row", "duplicate", "parallel", "k1", "conflicting"]))
def test_degenerate_gramians_give_finite_weights(case: str, dtype: torch.dtype) -> None:
    j = {**DEGENERATE, **_jacobians(torch.float64)}[case].to(dtype)
    g = j @ j.T
    for name, w in _all_weights(g).items():
        assert w.shape == (j.shape[0],) and torch.isfinite(w).all(), name
        assert torch.isfinite(w @ j).all(), name
    torch.manual_seed(0)
    assert torch.isfinite(graddrop_direction(j)).all()


def test_degenerate_cases_have_the_defined_values() -> None:
    j = _jacobians(torch.float64)["zero-row"]
    w = _all_weights(j @ j.T)
    for name in ("mgda", "nash-mtl", "fairgrad", "imtl-g", "aligned-mtl", "config"):
        assert w[name][2] == 0.0, name  # a task without gradient gets no weight
    present = j[[0, 1, 3]]
    _close(_dir(mgda_weights, j), _dir(mgda_weights, present), 1e-12)  # ... and does not stop MGDA
    _close(_dir(nash_mtl_weights, j), _dir(nash_mtl_weights, present), 1e-9)
    d = _dir(cagrad_weights, j, 0.4, 0)
    assert float(d.norm()) > 0.1 and float((present @ d).min()) >= float((present @ j.mean(0)).min()) - 1e-9
    j1 = _jacobians(torch.float64)["k1"]
    for name, wk in _all_weights(j1 @ j1.T).items():  # one task: its own gradient up to scale
        assert float(wk[0]) > 0, name
    dup = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert mgda_weights(dup @ dup.T).tolist() == pytest.approx([0.25, 0.25, 0.5])  # duplicates share
    opp = DEGENERATE["opposite"].double()
    assert float(_dir(mgda_weights, opp).norm()) < 1e-9  # Pareto-stationary: no common descent
    assert float(_dir(nash_mtl_weights, opp[:2]).norm()) < 1e-3


def test_box_qp_matches_a_reference_qp_solver() -> None:
    solve_qp = pytest.importorskip("qpsolvers").solve_qp
    pytest.importorskip("quadprog")
    rng = np.random.default_rng(0)
    for _ in range(100):
        k = int(rng.integers(1, 9))
        jj = rng.standard_normal((k, int(rng.integers(1, 10))))
        a = jj @ jj.T + 1e-3 * np.eye(k)
        lower = rng.standard_normal((3, k))
        x, it = box_qp(a, lower)
        assert it <= 4 * k + 10
        for r in range(3):
            ref = solve_qp(a, np.zeros(k), -np.eye(k), -lower[r], solver="quadprog")
            assert np.abs(x[r] - ref).max() <= 1e-9 * (1 + np.abs(ref).max())


def test_alpha_fair_newton_converges_fast() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        k = int(rng.integers(2, 9))
        jj = rng.standard_normal((k, k + 5))
        g = jj @ jj.T
        for p in (0.5, 1.0, 2.0):
            w, it = alpha_fair(g, p)
            assert it <= 12 and np.abs(g @ w * w**p - 1).max() < 1e-6


# ------------------------------------------------------------------------------- through the engine


def _engine(model: str = "shared-bottom", no_labels_for: str | None = None, seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny model's losses and engine, with the shared linear layers captured as the trainer does."""
    st = tiny_step(model, no_labels_for=no_labels_for, seed=seed)
    return st.net, st.engine, st.shared


def _reference_jacobian(engine: GradientEngine, params: list[torch.nn.Parameter]) -> torch.Tensor:
    rows = []
    for t in engine.task_names:
        loss = engine.losses[t]
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if loss.requires_grad else None
        gs = gs or [None] * len(params)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params, strict=True)]
            )
        )
    return torch.stack(rows)


def test_registry_has_every_method_with_paper_and_level() -> None:
    for name in MINE:
        entry = BALANCERS[name]
        assert entry.paper and entry.description
        assert entry.cls.level == ("representation" if name == "mgda-ub" else "gradient")
    assert BALANCERS["cagrad"].defaults == {"c": 0.4, "rescale": 1}
    assert BALANCERS["nash-mtl"].defaults == {"max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20}


@pytest.mark.parametrize("no_labels_for", [None, "b"])
@pytest.mark.parametrize("name", MINE)
def test_engine_writes_finite_grads_equal_to_the_combination(name: str, no_labels_for: str | None) -> None:
    net, engine, shared = _engine(no_labels_for=no_labels_for)
    if name == "mgda-ub":
        z = engine.representation_jacobian()
        ref_w = mgda_weights(z @ z.T)
    j = _reference_jacobian(engine, shared)
    bal = build_balancer(name, TASKS)
    torch.manual_seed(0)
    weights = bal.backward(engine.losses, engine)
    assert set(weights) == {"a", "b", "c"} and all(math.isfinite(v) for v in weights.values())
    got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shared])
    assert torch.isfinite(got).all() and float(got.abs().sum()) > 0
    for p in net.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    if name == "graddrop":
        torch.manual_seed(0)
        assert torch.allclose(got, graddrop_direction(j), atol=1e-6)
    else:
        w = torch.tensor([weights[t] for t in ("a", "b", "c")])
        assert torch.allclose(got, w @ j, atol=1e-5, rtol=1e-4)
    if name == "mgda-ub":
        assert torch.allclose(w, ref_w, atol=1e-6)
    if no_labels_for and name in ("mgda", "mgda-ub", "nash-mtl", "fairgrad"):
        assert weights["b"] == 0.0


@pytest.mark.parametrize("name", MINE)
def test_models_without_shared_parameters_are_refused(name: str) -> None:
    _, engine, _ = _engine("single")
    with pytest.raises(NoSharedParametersError):
        build_balancer(name, TASKS).backward(engine.losses, engine)


def test_nash_mtl_clips_and_reuses_weights_between_updates() -> None:
    bal = build_balancer("nash-mtl", TASKS, max_norm=0.05, update_weights_every=2)
    _, engine, shared = _engine(seed=1)
    j = _reference_jacobian(engine, shared)
    w1 = bal.backward(engine.losses, engine)
    d = torch.tensor(list(w1.values())) @ j
    assert float(d.norm()) == pytest.approx(0.05, rel=1e-4)  # clipped, still J^T w
    alpha = bal.alpha.clone()
    _, engine, shared = _engine(seed=2)  # second step: stored weights, no Gramian
    j = _reference_jacobian(engine, shared)
    w2 = bal.backward(engine.losses, engine)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.equal(bal.alpha, alpha) and int(bal.step) == 2
    assert torch.allclose(got, torch.tensor(list(w2.values())) @ j, atol=1e-6)
    assert float(got.norm()) <= 0.05 * (1 + 1e-5)


@pytest.mark.parametrize("name", ["gradvac", "nash-mtl", "fairgrad"])
def test_state_lives_in_buffers_so_checkpoints_restore_it(name: str) -> None:
    bal = build_balancer(name, TASKS)
    for seed in range(2):
        _, engine, _ = _engine(seed=seed)
        torch.manual_seed(seed)
        bal.backward(engine.losses, engine)
    state = bal.state_dict()
    assert state and all(torch.isfinite(v.double()).all() for v in state.values())
    other = build_balancer(name, TASKS)
    other.load_state_dict(state)
    _, e1, _ = _engine(seed=5)
    _, e2, _ = _engine(seed=5)
    torch.manual_seed(9)
    w1 = bal.backward(e1.losses, e1)
    torch.manual_seed(9)
    w2 = other.backward(e2.losses, e2)
    assert w1 == pytest.approx(w2, rel=1e-9, abs=1e-12)


def test_gradvac_targets_track_the_cosines() -> None:
    j = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    _, targets = gradvac_weights(j @ j.T, torch.zeros(2, 2, dtype=torch.float64), beta=0.5)
    cos = 1 / math.sqrt(2)
    assert targets.flatten().tolist() == pytest.approx([0.0, 0.5 * cos, 0.5 * cos, 0.0])
    # a pair below its target is raised exactly to it: g_1' = g_1 + c_1 g_2, g_2' = g_2 + c_2 g_1
    g1, g2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-0.5, 1.0], dtype=torch.float64)
    jc = torch.stack([g1, g2])
    w, _ = gradvac_weights(jc @ jc.T, torch.full((2, 2), 0.5, dtype=torch.float64), beta=0.0)
    c2, c1 = float(w[0]) - 1, float(w[1]) - 1
    assert float(torch.cosine_similarity(g1 + c1 * g2, g2, dim=0)) == pytest.approx(0.5)
    assert float(torch.cosine_similarity(g2 + c2 * g1, g1, dim=0)) == pytest.approx(0.5)


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(ValueError, match="cagrad"):
        build_balancer("cagrad", TASKS, c=-1.0)
    with pytest.raises(ValueError, match="leak"):
        build_balancer("graddrop", TASKS, leak=1.5)
    with pytest.raises(ValueError, match="scale_mode"):
        build_balancer("aligned-mtl", TASKS, scale_mode="max")
    with pytest.raises(ValueError, match="nash-mtl"):
        build_balancer("nash-mtl", TASKS, update_weights_every=0)
    with pytest.raises(FloatingPointError):
        upgrad_weights(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
