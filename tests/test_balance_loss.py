"""Loss-level balancers: reference values and defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.balance import BALANCERS, GradientEngine, build_balancer
from polytask.data import load_dataset
from polytask.tasks import Task
from polytask.train import TrainConfig, Trainer

TASKS = [Task("a", "regression"), Task("b", "regression"), Task("c", "regression")]


def _engine(values: list[float]) -> tuple[GradientEngine, torch.nn.Parameter]:
    """Losses L_k = v_k * theta^2 at theta = 1, so dL_k/dtheta = 2 v_k."""
    theta = torch.nn.Parameter(torch.ones(()))
    losses = {t.name: v * theta**2 for t, v in zip(TASKS[: len(values)], values, strict=True)}
    return GradientEngine(losses, [theta]), theta


def test_fixed_weights() -> None:
    engine, theta = _engine([1.0, 2.0, 3.0])
    w = build_balancer("fixed", TASKS, weights={"a": 0.5, "c": 2.0}).backward(engine.losses, engine)
    assert w == {"a": 0.5, "b": 1.0, "c": 2.0}  # 'b' keeps its Task.weight
    assert theta.grad.item() == pytest.approx(2 * (0.5 * 1 + 1 * 2 + 2 * 3))
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['z'\]"):
        build_balancer("fixed", TASKS, weights={"z": 1.0})


def test_dwa_reference_values() -> None:
    bal = build_balancer("dwa", TASKS, temperature=2.0)
    engine, _ = _engine([1.0, 1.0, 1.0])
    assert bal.backward(engine.losses, engine) == {"a": 1.0, "b": 1.0, "c": 1.0}
    bal.epoch_end(1, {"a": 2.0, "b": 1.0, "c": 4.0})
    bal.epoch_end(2, {"a": 1.0, "b": 1.0, "c": 4.0})
    engine, _ = _engine([1.0, 1.0, 1.0])
    w = bal.backward(engine.losses, engine)
    # r = (0.5, 1, 1); w = 3 * softmax(r / 2)
    e = [math.exp(0.25), math.exp(0.5), math.exp(0.5)]
    assert [w[t] for t in "abc"] == pytest.approx([3 * x / sum(e) for x in e])
    # The state lives in buffers, so a checkpoint restores it.
    other = build_balancer("dwa", TASKS)
    other.load_state_dict(bal.state_dict())
    assert torch.equal(other.w, bal.w)


def test_rlw_draws_a_point_of_the_simplex_reproducibly() -> None:
    torch.manual_seed(0)
    engine, _ = _engine([1.0, 1.0, 1.0])
    w1 = build_balancer("rlw", TASKS).backward(engine.losses, engine)
    torch.manual_seed(0)
    engine, _ = _engine([1.0, 1.0, 1.0])
    w2 = build_balancer("rlw", TASKS).backward(engine.losses, engine)
    assert w1 == w2 and sum(w1.values()) == pytest.approx(1.0) and min(w1.values()) > 0


def test_gls_gradient_is_that_of_the_geometric_mean() -> None:
    engine, theta = _engine([1.0, 2.0, 4.0])
    w = build_balancer("gls", TASKS).backward(engine.losses, engine)
    # G(theta) = (8 theta^6)^(1/3) = 2 theta^2 -> dG/dtheta = 4 at theta = 1
    assert theta.grad.item() == pytest.approx(4.0)
    assert [w[t] for t in "abc"] == pytest.approx([2 / 3, 1 / 3, 1 / 6])
    engine, theta = _engine([1.0, 0.0, 4.0])  # a task without labels has loss exactly 0
    w = build_balancer("gls", TASKS).backward(engine.losses, engine)
    assert w["b"] == 0.0 and math.isfinite(theta.grad.item())
    assert theta.grad.item() == pytest.approx(2 * 2.0)  # sqrt(1 * 4) theta^2 -> 2 * 2


def test_imtl_l_scales_are_driven_to_equalise_scaled_losses() -> None:
    bal = build_balancer("imtl-l", TASKS)
    engine, _ = _engine([1.0, 2.0, 4.0])
    bal.backward(engine.losses, engine)
    # d/ds [e^s L - s] = e^s L - 1 at s = 0
    assert bal.s.grad.tolist() == pytest.approx([0.0, 1.0, 3.0])


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_trains_multi_mnist_without_nan(name: str, data_dir: object) -> None:
    data = load_dataset("multi-mnist", n_train=512, n_val=128, n_test=128)
    from polytask.nn import build_model

    torch.manual_seed(0)
    model = build_model("shared-bottom", data.tasks, data.input_spec)
    cfg = TrainConfig(epochs=1, batch_size=64, patience=None)
    res = Trainer(model, data, name, cfg, progress=False).fit()
    assert all(math.isfinite(v) for m in res.val.values() for v in m.values())
    assert all(math.isfinite(w) for w in res.history[0]["weights"].values())


def test_famo_weights_and_logit_update() -> None:
    bal = build_balancer("famo", TASKS[:2])
    engine, _ = _engine([2.0, 1.0])
    w = bal.backward(engine.losses, engine)
    # z uniform at the start: w_k = (1/L_k) / sum_j (1/L_j)
    assert [w["a"], w["b"]] == pytest.approx([(1 / 2) / 1.5, 1 / 1.5])
    # Task a's loss halves while b's stays: a is learning faster, so its logit (weight) drops.
    engine, _ = _engine([1.0, 1.0])
    bal.backward(engine.losses, engine)
    z = torch.softmax(bal.xi, 0)
    assert z[0] < z[1]
    restored = build_balancer("famo", TASKS[:2])
    restored.load_state_dict(bal.state_dict())
    assert torch.equal(restored.xi, bal.xi) and torch.equal(restored.adam_v, bal.adam_v)


def test_stch_warmup_then_smooth_max() -> None:
    bal = build_balancer("stch", TASKS[:2], mu=0.5, warmup_epochs=1)
    engine, theta = _engine([2.0, 4.0])
    w = bal.backward(engine.losses, engine)
    assert [w["a"], w["b"]] == pytest.approx([1 / 2, 1 / 4])  # warm-up: sum of log-losses
    assert theta.grad.item() == pytest.approx(2 + 2)  # d/dtheta [log 2 theta^2 + log 4 theta^2] = 4 / theta
    bal.epoch_end(1, {"a": 2.0, "b": 4.0})
    assert bal.nadir.tolist() == [2.0, 4.0]
    engine, theta = _engine([1.0, 4.0])  # a improved by half relative to its nadir, b did not
    w = bal.backward(engine.losses, engine)
    z = torch.tensor([math.log(0.5), 0.0]) / 0.5
    soft = torch.softmax(z, 0)
    assert [w["a"], w["b"]] == pytest.approx([soft[0].item() / 1.0, soft[1].item() / 4.0])
    # gradient of mu * logsumexp(...) = sum_k soft_k * dlog L_k/dtheta = sum_k soft_k * 2 at theta = 1
    assert theta.grad.item() == pytest.approx(2.0)


def test_gradnorm_moves_weights_towards_equal_gradient_norms() -> None:
    from polytask.data import InputSpec
    from polytask.nn import build_model

    tasks = [Task("a", "regression"), Task("b", "regression")]
    torch.manual_seed(0)
    net = build_model("shared-bottom", tasks, InputSpec("tabular", n_numeric=3, cardinalities=(4,)))
    x = {"num": torch.randn(32, 3), "cat": torch.randint(0, 4, (32, 1))}
    preds, reps = net.forward_with_representation(x)
    # Task b's labels are 10x larger: its gradient at the representation is much larger.
    losses = {"a": tasks[0].loss(preds["a"], torch.randn(32)), "b": tasks[1].loss(preds["b"], 10 * torch.randn(32))}
    shared = list(net.shared_parameters())
    engine = GradientEngine(losses, shared, [p for p in net.parameters() if all(p is not s for s in shared)], reps)
    bal = build_balancer("gradnorm", tasks, alpha=1.5)
    w = bal.backward(losses, engine)
    assert w == {"a": 1.0, "b": 1.0}
    assert bal.w.grad[1] > 0 > bal.w.grad[0]  # descent lowers w_b and raises w_a


def test_db_mtl_reference_and_checkpoint_round_trip() -> None:
    from polytask.data import InputSpec
    from polytask.nn import build_model

    tasks = [Task("a", "regression"), Task("b", "regression")]
    spec = InputSpec("tabular", n_numeric=3, cardinalities=(4,))
    torch.manual_seed(0)
    net = build_model("shared-bottom", tasks, spec)
    shared = list(net.shared_parameters())
    specific = [p for p in net.parameters() if all(p is not s for s in shared)]
    bal = build_balancer("db-mtl", tasks, beta=0.9, beta_sigma=0.5, grads="parameters")
    assert bal.level == "gradient"
    ema = None
    for step in (1, 2):
        for p in net.parameters():
            p.grad = None
        x = {"num": torch.randn(16, 3), "cat": torch.randint(0, 4, (16, 1))}
        preds = net(x)
        losses = {"a": tasks[0].loss(preds["a"], torch.randn(16)), "b": tasks[1].loss(preds["b"], 5 * torch.randn(16))}
        ref_j = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, shared, retain_graph=True)])
                for v in losses.values()
            ]
        )
        inv = torch.stack([1 / (v.detach() + 1e-8) for v in losses.values()])
        g = ref_j * inv[:, None]
        ema = g if ema is None else g + 0.9 / step**0.5 * (ema - g)
        norms = ema.norm(dim=1)
        expected = (norms.max() / (norms + 1e-8)) @ ema
        bal.backward(losses, GradientEngine(losses, shared, specific))
        got = torch.cat([p.grad.reshape(-1) for p in shared])
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)
    restored = build_balancer("db-mtl", tasks, grads="parameters")
    restored.load_state_dict(bal.state_dict())
    assert torch.equal(restored.grad_ema, bal.grad_ema) and int(restored.step) == 2


def test_db_mtl_representation_variant_reference() -> None:
    """Default variant: EMA of the norms of grad_z log L_k; shared parameters get
    sum_k alpha_k grad log L_k, task-specific ones their own grad log L_k (not scaled by alpha)."""
    from polytask.data import InputSpec
    from polytask.nn import build_model

    tasks = [Task("a", "regression"), Task("b", "regression")]
    spec = InputSpec("tabular", n_numeric=3, cardinalities=(4,))
    torch.manual_seed(0)
    net = build_model("shared-bottom", tasks, spec)
    shared = list(net.shared_parameters())
    specific = [p for p in net.parameters() if all(p is not s for s in shared)]
    bal = build_balancer("db-mtl", tasks)
    assert bal.level == "representation"
    ema = None
    for step in (1, 2, 3):
        for p in net.parameters():
            p.grad = None
        x = {"num": torch.randn(16, 3), "cat": torch.randint(0, 4, (16, 1))}
        preds, reps = net.forward_with_representation(x)
        losses = {"a": tasks[0].loss(preds["a"], torch.randn(16)), "b": tasks[1].loss(preds["b"], 5 * torch.randn(16))}
        logs = [torch.log(v + 1e-8) for v in losses.values()]
        rep_norms = torch.stack([torch.autograd.grad(v, reps, retain_graph=True)[0].norm() for v in logs])
        ema = rep_norms if ema is None else rep_norms + 0.9 / step**0.5 * (ema - rep_norms)
        alpha = ema.max() / (ema + 1e-8)
        want_shared = [
            sum(a * g for a, g in zip(alpha, gs, strict=True))
            for gs in zip(*(torch.autograd.grad(v, shared, retain_graph=True) for v in logs), strict=True)
        ]
        want_specific = torch.autograd.grad(sum(logs), specific, retain_graph=True, allow_unused=True)
        w = bal.backward(losses, GradientEngine(losses, shared, specific, reps))
        assert w["a"] == pytest.approx(float(alpha[0] / (losses["a"].detach() + 1e-8)), rel=1e-5)
        for p, g in zip(shared, want_shared, strict=True):
            assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
        for p, g in zip(specific, want_specific, strict=True):
            assert g is None or torch.allclose(p.grad, g, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="grads must be"):
        build_balancer("db-mtl", tasks, grads="jacobian")
