from __future__ import annotations

import pytest
import torch

from engine_helpers import IMAGE, TASKS, tiny_step
from engine_helpers import TABULAR as SPEC
from polytask.balance import BALANCERS, NoSharedParametersError, build_balancer
from polytask.data import InputSpec


def _setup(model: str = "shared-bottom", no_labels_for: str | None = None):  # type: ignore[no-untyped-def]
    st = tiny_step(model, no_labels_for=no_labels_for, capture=False)
    return st.net, st.losses, st.engine, st.shared


def _naive_grads(losses, params):  # type: ignore[no-untyped-def]
    rows = []
    for loss in losses.values():
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params, strict=True)]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("model", ["shared-bottom", "mmoe", "ple"])
def test_jacobian_and_gramian_match_naive_reference(model: str) -> None:
    _, losses, engine, shared = _setup(model)
    ref = _naive_grads(losses, shared)
    assert torch.allclose(engine.jacobian(), ref)
    assert torch.allclose(engine.gramian(), ref @ ref.T)
    assert engine.representation_jacobian().shape[0] == 3


def test_task_without_labels_has_zero_row() -> None:
    _, _, engine, _ = _setup(no_labels_for="b")
    j = engine.jacobian()
    assert torch.count_nonzero(j[1]) == 0 and torch.count_nonzero(j[0]) > 0
    assert not torch.isnan(engine.gramian()).any()


def test_backward_weighted_equals_weighted_sum_gradient() -> None:
    _, losses, engine, shared = _setup()
    ref = _naive_grads(losses, shared)
    engine.backward_weighted({"a": 2.0, "b": 0.5, "c": 0.0})
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    assert torch.allclose(got, 2.0 * ref[0] + 0.5 * ref[1], atol=1e-6)


def test_apply_shared_direction_gives_task_specific_params_their_own_gradient() -> None:
    net, losses, engine, shared = _setup()
    specific_ref = {}
    for t in TASKS:
        params = list(net.task_parameters(t.name))
        gs = torch.autograd.grad(losses[t.name], params, retain_graph=True)
        specific_ref.update({id(p): g for p, g in zip(params, gs, strict=True)})
    direction = torch.randn(sum(p.numel() for p in shared))
    engine.apply_shared_direction(direction)
    assert torch.equal(torch.cat([p.grad.reshape(-1) for p in shared]), direction)
    for t in TASKS:
        for p in net.task_parameters(t.name):
            assert torch.allclose(p.grad, specific_ref[id(p)])


def test_gradient_methods_need_shared_parameters() -> None:
    _, _, engine, _ = _setup("single")
    with pytest.raises(NoSharedParametersError, match="declares none; use a loss-level balancer"):
        engine.jacobian()


def test_uncertainty_weighting_reference_values() -> None:
    _, losses, engine, _ = _setup()
    bal = build_balancer("uncertainty", TASKS, init_log_var=0.5)
    weights = bal.backward(losses, engine)
    # classification: exp(-s); regression: exp(-s) / 2 (Kendall et al. 2018, eqs. 5 and 10)
    assert weights["a"] == pytest.approx(torch.exp(torch.tensor(-0.5)).item())
    assert weights["c"] == pytest.approx(0.5 * torch.exp(torch.tensor(-0.5)).item())
    # d/ds [c exp(-s) L + s/2] = -c exp(-s) L + 1/2
    expected = torch.tensor([-weights[t] * losses[t].item() + 0.5 for t in ("a", "b", "c")])
    assert torch.allclose(bal.log_var.grad, expected, atol=1e-6)


def test_equal_weighting_is_plain_sum() -> None:
    _, losses, engine, shared = _setup()
    ref = _naive_grads(losses, shared).sum(0)
    assert build_balancer("equal", TASKS).backward(losses, engine) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert torch.allclose(torch.cat([p.grad.reshape(-1) for p in shared]), ref, atol=1e-6)


def test_registry_errors() -> None:
    assert {"equal", "uncertainty"} <= set(BALANCERS)
    with pytest.raises(KeyError, match=r"unknown balancer 'pcgradd'; available: .*equal"):
        build_balancer("pcgradd", TASKS)
    with pytest.raises(ValueError, match=r"balancer 'uncertainty' has no parameter \['alpha'\]; valid: init_log_var"):
        build_balancer("uncertainty", TASKS, alpha=1.0)


def _fast_setup(model: str, spec: InputSpec = SPEC, no_labels_for: str | None = None):  # type: ignore[no-untyped-def]
    st = tiny_step(model, spec, no_labels_for)
    assert st.engine.captures, "the model has shared linear layers to capture"
    return st.net, st.losses, st.engine, st.shared, st.specific


@pytest.mark.parametrize(
    ("model", "spec", "no_labels_for"),
    [
        ("shared-bottom", SPEC, None),
        ("mmoe", SPEC, None),
        ("ple", SPEC, "b"),
        ("shared-bottom", IMAGE, None),  # LeNet: convolutions take the generic path, fc the fast one
        ("mmoe", IMAGE, "a"),
    ],
)
def test_fast_engine_matches_naive_reference(model: str, spec: InputSpec, no_labels_for: str | None) -> None:
    net, losses, engine, shared, specific = _fast_setup(model, spec, no_labels_for)
    ref = _naive_grads(losses, shared)
    assert torch.allclose(engine.gramian(), ref @ ref.T, rtol=1e-4, atol=1e-6)
    assert torch.allclose(engine.jacobian(), ref, atol=1e-6)
    # Combined update: shared parameters get J^T w, task-specific ones their own task's gradient.
    own = {}
    for t in TASKS:
        params = list(net.task_parameters(t.name))
        if losses[t.name].requires_grad:
            gs = torch.autograd.grad(losses[t.name], params, retain_graph=True, allow_unused=True)
        else:
            gs = [None] * len(params)
        own.update({id(p): (g if g is not None else torch.zeros_like(p)) for p, g in zip(params, gs, strict=True)})
    w = torch.tensor([0.2, 1.5, -0.3])
    engine.apply_shared_weights(dict(zip(["a", "b", "c"], w.tolist(), strict=True)))
    got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shared])
    assert torch.allclose(got, w @ ref, atol=1e-5)
    for p in specific:
        assert torch.allclose(p.grad if p.grad is not None else torch.zeros_like(p), own[id(p)], atol=1e-6)


@pytest.mark.parametrize(("m", "width", "out"), [(8, 300, 200), (512, 20, 10)])
def test_layer_gramian_both_contractions_agree(m: int, width: int, out: int) -> None:
    """Kernel form <D_k, X X^T D_l> (large layers, few rows) and explicit dW_k = D_k^T X (small layers)."""
    from polytask.balance._engine import _Layer

    torch.manual_seed(0)
    layer = _Layer(
        torch.nn.Linear(width, out),
        torch.randn(m, width, dtype=torch.float64),
        torch.randn(3, m, out, dtype=torch.float64),
    )
    dw, db = layer.per_task()
    explicit = torch.cat([dw.reshape(3, -1), db], dim=1)
    assert torch.allclose(layer.gramian(), explicit @ explicit.T)
