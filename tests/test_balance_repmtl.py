"""Rep-MTL (Wang, Li and Xu, ICCV 2025): reference values, defining properties and the balancer wiring."""

from __future__ import annotations

import math

import pytest
import torch

from engine_helpers import TABULAR, TASKS, tiny_step
from polytask.balance import GradientEngine, NoSharedParametersError, build_balancer
from polytask.balance.rep_mtl import csa_loss, rep_mtl_regulariser, saliency_layout, task_saliency, tsr_loss
from polytask.nn import build_model
from polytask.tasks import Task

D = torch.float64


# ----------------------------------------------------------------------------- independent reference
def _ref_tsr(sal: list[torch.Tensor]) -> torch.Tensor:
    """Eqs. 4-6 with loops: ``sal[t]`` is (B, C, P); positions where every task is zero are skipped."""
    n_tasks, (batch, channels, positions) = len(sal), sal[0].shape
    entropies = []
    for b in range(batch):
        for p in range(positions):
            a = [abs(sum(sal[t][b, c, p] for c in range(channels)) / channels) for t in range(n_tasks)]
            total = sum(a)
            if total == 0:
                continue
            entropies.append(-sum((x / total) * torch.log(x / total) for x in a if x > 0))
    return sum(entropies) / len(entropies)


def _cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum() / (u.norm() * v.norm())


def _ref_csa(sal: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Eqs. 7-9 with explicit C x C matrices; pairs whose affinity is zero and negatives whose anchor
    is zero (samples without any label) are skipped."""
    n_tasks, batch = len(sal), sal[0].shape[0]
    affinity = [[sal[t][b] @ sal[t][b].T for b in range(batch)] for t in range(n_tasks)]
    anchors = []
    for b in range(batch):
        a = torch.stack([sal[t][b].mean(dim=1) for t in range(n_tasks)], dim=1)  # C x T
        anchors.append(a @ a.T)
    terms = []
    for b in range(batch):
        negatives = [
            torch.exp(_cos(anchors[b], anchors[k]) / tau) for k in range(batch) if k != b and anchors[k].abs().sum() > 0
        ]
        for t in range(n_tasks):
            if affinity[t][b].abs().sum() == 0:
                continue
            pos = _cos(anchors[b], affinity[t][b]) / tau
            terms.append(-pos + torch.log(sum(negatives)))
    return sum(terms) / len(terms)


# ----------------------------------------------------------------------------- a hand-built case
def _hand_built(mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Z (B=3, C=2, H=1, W=2), three heads ``y_t = <w_t, tanh(Z_b)>`` with squared error (mean over
    labelled samples): returns Z, the losses and the analytic saliencies (T, B, C, H, W)."""
    z = torch.tensor(
        [[[[0.5, -1.0]], [[0.2, 0.8]]], [[[-0.3, 0.4]], [[1.1, -0.6]]], [[[0.9, 0.1]], [[-0.7, 0.3]]]], dtype=D
    ).requires_grad_()
    w = torch.tensor([[1.0, -2.0, 0.5, 0.3], [0.2, 0.4, -1.5, 1.0], [-0.6, 0.9, 0.8, -0.2]], dtype=D)
    y = torch.tensor([[0.1, -0.4, 0.7], [1.0, 0.3, -0.2], [-0.5, 0.6, 0.2]], dtype=D)
    mask = torch.ones(3, 3, dtype=torch.bool) if mask is None else mask
    h = torch.tanh(z).reshape(3, 4)
    losses, analytic = [], []
    for t in range(3):
        r = h @ w[t] - y[t]
        n = max(int(mask[t].sum()), 1)
        losses.append(torch.where(mask[t], r**2, 0.0).sum() / n)
        # d/dZ_b of r_b^2 / n = 2 r_b / n * w_t * (1 - tanh(Z_b)^2), zero for unlabelled samples
        g = (2 * r.detach() / n * mask[t])[:, None] * w[t] * (1 - h.detach() ** 2)
        analytic.append(g.reshape(3, 2, 1, 2))
    return z, losses, torch.stack(analytic)


def test_saliency_is_the_representation_gradient() -> None:
    z, losses, analytic = _hand_built()
    sal = task_saliency(losses, z)
    assert sal.shape == (3, 3, 2, 1, 2)
    assert torch.allclose(sal, analytic, atol=1e-14)
    assert sal.requires_grad  # create_graph: the regulariser can be differentiated


@pytest.mark.parametrize("masked", [False, True])
def test_reference_values_on_hand_built_case(masked: bool) -> None:
    # masked: task 0 has no label on sample 1, task 2 none on samples 0 and 2 (zero saliency rows)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 0]], dtype=torch.bool) if masked else None
    z, losses, analytic = _hand_built(mask)
    sal = task_saliency(losses, z)
    per_task = [analytic[t].reshape(3, 2, 2) for t in range(3)]  # (B, C, H*W)
    tsr, csa = _ref_tsr(per_task), _ref_csa(per_task, 0.2)
    laid_out = saliency_layout(sal)
    assert laid_out.shape == (3, 3, 2, 2)
    assert tsr_loss(laid_out).item() == pytest.approx(tsr.item(), rel=1e-12)
    assert csa_loss(laid_out, 0.2).item() == pytest.approx(csa.item(), rel=1e-12)
    got = rep_mtl_regulariser(sal, lambda_tsr=0.7, lambda_csa=1.3, temperature=0.2)
    assert got.item() == pytest.approx(0.7 * tsr.item() + 1.3 * csa.item(), rel=1e-12)
    # The regulariser's gradient with respect to Z (through the saliency) is that of the reference.
    (g_got,) = torch.autograd.grad(got, z, retain_graph=True)
    ref_sal = task_saliency(losses, z)
    ref = 0.7 * _ref_tsr([ref_sal[t].reshape(3, 2, 2) for t in range(3)]) + 1.3 * _ref_csa(
        [ref_sal[t].reshape(3, 2, 2) for t in range(3)], 0.2
    )
    (g_ref,) = torch.autograd.grad(ref, z)
    assert torch.allclose(g_got, g_ref, atol=1e-12) and g_got.abs().sum() > 0


def test_layouts_vector_and_expert_stacks() -> None:
    torch.manual_seed(0)
    vec = torch.randn(3, 5, 7, dtype=D)  # (T, B, R): R channels at one position
    assert torch.equal(saliency_layout(vec), vec[..., None])
    experts = torch.randn(3, 5, 4, 7, dtype=D)  # (T, B, E, d): d channels at E positions
    assert torch.equal(saliency_layout(experts), experts.transpose(2, 3))
    maps = torch.randn(3, 5, 7, 2, 3, dtype=D)  # (T, B, C, H, W): channel-first
    assert torch.equal(saliency_layout(maps), maps.reshape(3, 5, 7, 6))
    assert rep_mtl_regulariser(experts).item() == pytest.approx(
        rep_mtl_regulariser(experts.transpose(2, 3)[..., None]).item(), rel=1e-12
    )


# ----------------------------------------------------------------------------- defining properties
def test_tsr_is_zero_for_one_hot_and_log_t_for_uniform_saliency() -> None:
    torch.manual_seed(0)
    t, b, c, p = 3, 4, 5, 6
    owner = torch.randint(0, t, (b, p))
    base = torch.rand(b, c, p, dtype=D) + 0.1
    one_hot = torch.stack([base * (owner == k)[:, None, :] for k in range(t)])
    assert tsr_loss(one_hot).item() == pytest.approx(0.0, abs=1e-15)
    uniform = torch.stack([base, -base, base])  # equal |channel mean| for every task
    assert tsr_loss(uniform).item() == pytest.approx(math.log(t), rel=1e-12)
    mixed = torch.randn(t, b, c, p, dtype=D)
    assert 0.0 < tsr_loss(mixed).item() < math.log(t)


def test_csa_reference_for_aligned_saliency_and_shuffling_raises_it() -> None:
    torch.manual_seed(0)
    b, c, tau = 6, 8, 0.5
    x = torch.randn(b, c, dtype=D)
    scales = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    aligned = (scales[:, None, None] * x[None])[..., None]  # (T, B, C, 1): every task sees x_b
    # Every positive pair is then identical (sim 1); negatives are cos(x_b x_b^T, x_k x_k^T) = cos^2(x_b, x_k).
    cos2 = (torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T) ** 2
    expected = (
        sum(-1 / tau + math.log(sum(math.exp(cos2[i, k].item() / tau) for k in range(b) if k != i)) for i in range(b))
        / b
    )
    assert csa_loss(aligned, tau).item() == pytest.approx(expected, rel=1e-12)
    shuffled = aligned.clone()
    shuffled[1] = aligned[1, torch.roll(torch.arange(b), 1)]
    shuffled[2] = aligned[2, torch.roll(torch.arange(b), 2)]
    assert csa_loss(shuffled, tau).item() > csa_loss(aligned, tau).item() + 0.1


def test_regulariser_invariant_to_task_order_and_common_scale() -> None:
    torch.manual_seed(1)
    sal = torch.randn(3, 6, 5, 4, dtype=D)
    ref = rep_mtl_regulariser(sal).item()
    assert rep_mtl_regulariser(sal[[2, 0, 1]]).item() == pytest.approx(ref, rel=1e-12)
    assert rep_mtl_regulariser(1e-7 * sal).item() == pytest.approx(ref, rel=1e-12)
    # float32 with tiny gradients: the detached rescaling keeps it finite and equal
    small = (1e-12 * sal).float()
    assert rep_mtl_regulariser(small).item() == pytest.approx(ref, rel=1e-4)


def test_unlabelled_task_acts_as_absent_and_zero_rows_are_finite() -> None:
    torch.manual_seed(2)
    sal = torch.randn(2, 5, 4, 3, dtype=D, requires_grad=True)
    with_zero = torch.cat([sal, torch.zeros(1, 5, 4, 3, dtype=D)])
    assert rep_mtl_regulariser(with_zero).item() == pytest.approx(rep_mtl_regulariser(sal).item(), rel=1e-12)
    # Some samples unlabelled for some tasks, one sample for all: finite value and gradient.
    rows = torch.ones(3, 5, 1, 1, dtype=D)
    rows[0, 1] = rows[1, 3] = 0
    rows[:, 4] = 0
    masked = with_zero * rows
    per_task = [saliency_layout(masked)[k] for k in range(3)]
    expected = 0.9 * _ref_tsr(per_task) + 0.9 * _ref_csa(per_task, 0.5)  # the defaults
    got = rep_mtl_regulariser(masked)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    (g,) = torch.autograd.grad(got, sal)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # Nothing labelled at all: an exact, differentiable zero.
    zero = rep_mtl_regulariser(torch.zeros(3, 5, 4, dtype=D, requires_grad=True))
    assert zero.item() == 0.0 and zero.requires_grad
    # A batch of one has no negatives: only the positive part remains.
    one = sal[:, :1].detach()
    assert math.isfinite(csa_loss(saliency_layout(one), 0.1).item())


# ----------------------------------------------------------------------------- the balancer
def _step(model: str = "shared-bottom", seed: int = 0, mask: dict[str, torch.Tensor] | None = None):  # type: ignore[no-untyped-def]
    """As ``tiny_step`` but float64 and with per-sample label masks."""
    torch.manual_seed(seed)
    net = build_model(model, TASKS, TABULAR).to(D)
    n = 16
    x = {"num": torch.randn(n, 3, dtype=D), "cat": torch.randint(0, 4, (n, 1))}
    y = {"a": torch.randint(0, 2, (n,)).to(D), "b": torch.randint(0, 3, (n,)), "c": torch.randn(n, dtype=D)}
    mask = mask or {t: torch.ones(n, dtype=torch.bool) for t in y}
    shared_names = set(net.shared_parameter_names())
    shared = [p for name, p in net.named_parameters() if name in shared_names]
    specific = [p for name, p in net.named_parameters() if name not in shared_names]
    preds, reps = net.forward_with_representation(x)
    losses = {t.name: t.loss(preds[t.name], y[t.name], mask[t.name]) for t in TASKS}
    return net, losses, GradientEngine(losses, shared, specific, reps), reps


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def test_zero_coefficients_give_the_base_gradients_exactly() -> None:
    net1, losses1, engine1, _ = _step()
    rep = build_balancer(
        "rep-mtl", TASKS, base="uncertainty", base_params={"init_log_var": 0.3}, lambda_tsr=0.0, lambda_csa=0.0
    )
    w1 = rep.backward(losses1, engine1)
    net2, losses2, engine2, _ = _step()
    base = build_balancer("uncertainty", TASKS, init_log_var=0.3)
    w2 = base.backward(losses2, engine2)
    assert w1 == w2
    assert all(torch.equal(g1, g2) for g1, g2 in zip(_grads(net1), _grads(net2), strict=True))
    assert torch.equal(rep.base.log_var.grad, base.log_var.grad)


@pytest.mark.parametrize(("model", "base"), [("shared-bottom", "equal"), ("mmoe", "dwa")])
def test_regulariser_gradient_is_added_to_the_base_update(model: str, base: str) -> None:
    lt, lc, tau = 0.8, 1.2, 0.3
    net1, losses1, engine1, _ = _step(model)
    build_balancer("rep-mtl", TASKS, base=base, lambda_tsr=lt, lambda_csa=lc, temperature=tau).backward(
        losses1, engine1
    )
    net2, losses2, engine2, _ = _step(model)
    build_balancer(base, TASKS).backward(losses2, engine2)
    # Independent: saliency by autograd, regulariser from the loop reference, its gradient by autograd.
    net3, losses3, _, reps3 = _step(model)
    sal = torch.stack(
        [torch.autograd.grad(losses3[t.name], reps3[0], create_graph=True)[0] for t in TASKS]
    )  # (T, B, ...)
    per_task = [saliency_layout(sal)[k] for k in range(len(TASKS))]
    reg = lt * _ref_tsr(per_task) + lc * _ref_csa(per_task, tau)
    ref = torch.autograd.grad(reg, list(net3.parameters()), allow_unused=True)
    shared_names = set(net1.shared_parameter_names())
    moved_shared = False
    for (name, _), g1, g2, r in zip(net1.named_parameters(), _grads(net1), _grads(net2), ref, strict=True):
        r = torch.zeros_like(g1) if r is None else r
        assert torch.allclose(g1 - g2, r, rtol=1e-7, atol=1e-12), name
        moved_shared |= name in shared_names and bool(r.abs().sum() > 0)
    assert moved_shared


def test_task_without_labels_gives_finite_gradients_and_acts_as_absent() -> None:
    st = tiny_step("mmoe", no_labels_for="b", capture=False)
    rep = build_balancer("rep-mtl", TASKS)
    rep.backward(st.losses, st.engine)
    assert all(torch.isfinite(p.grad).all() for p in st.net.parameters() if p.grad is not None)
    # The regulariser equals the one of the two labelled tasks alone.
    st = tiny_step("mmoe", no_labels_for="b", capture=False)
    full = rep.regulariser(st.losses, st.engine.representation)
    two = [TASKS[0], TASKS[2]]
    alone = build_balancer("rep-mtl", two).regulariser(
        {t.name: st.losses[t.name] for t in two}, st.engine.representation
    )
    assert full.item() == pytest.approx(alone.item(), rel=1e-5)


def test_per_sample_masks_give_finite_gradients() -> None:
    torch.manual_seed(3)
    n = 16
    mask = {t: torch.rand(n) > 0.5 for t in "abc"}
    mask["a"][:] = False
    mask["a"][3] = True
    net, losses, engine, _ = _step("ple", mask=mask)
    build_balancer("rep-mtl", TASKS, base="gls").backward(losses, engine)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


@pytest.mark.parametrize("base", ["mgda", "nope", "rep-mtl"])
def test_only_loss_level_bases_are_accepted(base: str) -> None:
    with pytest.raises(
        ValueError, match=rf"rep-mtl base '{base}' is not a loss-level .*valid: .*equal.*uncertainty"
    ) as e:
        build_balancer("rep-mtl", TASKS, base=base)
    assert "\n" not in str(e.value) and "mgda" not in str(e.value).split("valid:")[1]


def test_model_without_representation_is_refused() -> None:
    st = tiny_step("single", capture=False)
    with pytest.raises(NoSharedParametersError, match=r"rep-mtl .* exposes none"):
        build_balancer("rep-mtl", TASKS).backward(st.losses, st.engine)


def test_base_is_a_submodule_and_receives_epoch_end() -> None:
    rep = build_balancer("rep-mtl", TASKS, base="uncertainty")
    assert "base.log_var" in rep.state_dict()
    assert any(p is rep.base.log_var for p in rep.parameters())  # the trainer optimises it
    two = [Task("a", "regression"), Task("b", "regression")]
    rep = build_balancer("rep-mtl", two, base="dwa", base_params={"temperature": 2.0})
    dwa = build_balancer("dwa", two, temperature=2.0)
    for epoch, losses in enumerate([{"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 1.0}], start=1):
        rep.epoch_end(epoch, losses)
        dwa.epoch_end(epoch, losses)
    assert torch.equal(rep.base.w, dwa.w) and not torch.equal(dwa.w, torch.ones(2))
    restored = build_balancer("rep-mtl", two, base="dwa")
    restored.load_state_dict(rep.state_dict())
    assert torch.equal(restored.base.w, dwa.w)


def test_bad_hyper_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="temperature > 0"):
        build_balancer("rep-mtl", TASKS, temperature=0.0)
    with pytest.raises(ValueError, match="lambda_tsr, lambda_csa >= 0"):
        build_balancer("rep-mtl", TASKS, lambda_csa=-1.0)
    with pytest.raises(ValueError, match="base_params must be a mapping"):
        build_balancer("rep-mtl", TASKS, base_params=0.5)
    with pytest.raises(ValueError, match=r"balancer 'uncertainty' has no parameter \['alpha'\]"):
        build_balancer("rep-mtl", TASKS, base="uncertainty", base_params={"alpha": 1.0})


def test_tiny_saliencies_give_finite_gradients_in_float32() -> None:
    """A sample whose saliency is denormal-small (a confidently right prediction) must not turn the
    regulariser's gradient into inf/NaN (it did on Census before the floors were introduced)."""
    torch.manual_seed(0)
    for scale in (1e-20, 1e-30, 1e-38):
        s = torch.randn(2, 6, 8)
        s[:, 1] *= scale
        s[0, 2] *= scale
        s.requires_grad_(True)
        total = rep_mtl_regulariser(s, 0.9, 0.9, 0.5)
        (g,) = torch.autograd.grad(total, s)
        assert torch.isfinite(total) and torch.isfinite(g).all(), scale
