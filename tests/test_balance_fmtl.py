"""F-MTL (per-task SAM around a gradient-level aggregator): reference values, restoration, errors, training."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from engine_helpers import IMAGE, TABULAR, TASKS, tiny_step
from polytask.balance import BALANCERS, GradientEngine, build_balancer
from polytask.balance.fmtl import FMTL
from polytask.balance.mgda import mgda_weights
from polytask.balance.upgrad import upgrad_weights
from polytask.data import DataBundle, InputSpec, TaskTensors
from polytask.nn import build_model
from polytask.train import TrainConfig, Trainer

BASES = sorted(n for n, e in BALANCERS.items() if e.cls.level == "gradient" and n != "f-mtl")
# Every gradient-level base, with the parameters that make it one where its level depends on them.
CASES = [(n, {}) for n in BASES]
if "grads" in BALANCERS["db-mtl"].defaults:
    CASES.append(("db-mtl", {"grads": "parameters"}))


def _grads(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


# ------------------------------------------------------------------------------ rho = 0 is the base
@pytest.mark.parametrize("no_labels_for", [None, "b"])
@pytest.mark.parametrize("base,params", CASES)
def test_rho_zero_is_exactly_the_base_method(base: str, params: dict, no_labels_for: str | None) -> None:
    st = tiny_step(reforward=True, no_labels_for=no_labels_for)
    torch.manual_seed(3)  # PCGrad and GradDrop draw from the global generator
    fmtl = build_balancer("f-mtl", TASKS, base=base, rho=0.0, base_params=params)
    w = fmtl.backward(st.losses, st.engine)
    ref = tiny_step(no_labels_for=no_labels_for)
    torch.manual_seed(3)
    w_ref = build_balancer(base, TASKS, **params).backward(ref.losses, ref.engine)
    assert w == pytest.approx(w_ref, abs=1e-5)
    # shared parameters and task-specific ones (DB-MTL rescales the latter) alike
    for got, exp in zip(_grads(st.net), _grads(ref.net), strict=True):
        assert torch.allclose(got, exp, atol=1e-6, rtol=0), base


def test_rho_zero_follows_nash_mtl_between_weight_updates() -> None:
    """Nash-MTL's steps without a weight update back-propagate its weighted losses itself."""
    fmtl = build_balancer("f-mtl", TASKS, base="nash-mtl", rho=0.0, base_params={"update_weights_every": 2})
    nash = build_balancer("nash-mtl", TASKS, update_weights_every=2)
    for seed in (1, 2):
        st, ref = tiny_step(seed=seed, reforward=True), tiny_step(seed=seed)
        w = fmtl.backward(st.losses, st.engine)
        w_ref = nash.backward(ref.losses, ref.engine)
        assert w == pytest.approx(w_ref, rel=1e-5)
        for got, exp in zip(_grads(st.net), _grads(ref.net), strict=True):
            assert torch.allclose(got, exp, atol=1e-6, rtol=0)
    assert int(fmtl.base.step) == 2 and int(fmtl.flat_base.step) == 2


# ------------------------------------------------------------------------------ reference value
def _float64_step(seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    spec = InputSpec("tabular", n_numeric=3, cardinalities=(4,))
    net = build_model("shared-bottom", TASKS, spec, hidden=(8,), tower_hidden=(4,)).double()
    n = 12
    x = {"num": torch.randn(n, 3, dtype=torch.float64), "cat": torch.randint(0, 4, (n, 1))}
    y = {"a": torch.randint(0, 2, (n,)).double(), "b": torch.randint(0, 3, (n,)), "c": torch.randn(n).double()}
    mask = {t: torch.ones(n, dtype=torch.bool) for t in y}

    def losses_at(params: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        out = net(x) if params is None else functional_call(net, params, (x,))
        return {t.name: t.loss(out[t.name], y[t.name], mask[t.name]) for t in TASKS}

    shared_names = set(net.shared_parameter_names())
    shared = [p for name, p in net.named_parameters() if name in shared_names]
    specific = [p for name, p in net.named_parameters() if name not in shared_names]
    engine = GradientEngine(losses_at(), shared, specific, reforward=losses_at)
    return net, engine, losses_at


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


@pytest.mark.parametrize("base,weights_fn", [("upgrad", upgrad_weights), ("mgda", mgda_weights)])
def test_matches_a_hand_computed_reference(base: str, weights_fn) -> None:  # type: ignore[no-untyped-def]
    rho, rho_ns = 0.3, 0.1
    net, engine, losses_at = _float64_step()
    names = dict(net.named_parameters())
    shared = net.shared_parameter_names()
    theta = {k: v.detach().clone() for k, v in names.items()}
    rows_g, rows_h, sam_heads = [], [], {}
    for t in TASKS:
        head = net.task_parameter_names(t.name)
        leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
        loss = losses_at(leaves)[t.name]
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True), strict=True))
        g = torch.cat([grads[k].reshape(-1) for k in shared])
        g_ns = torch.cat([grads[k].reshape(-1) for k in head])
        # Algorithm 1, lines 3-4: each part perturbed along its own normalised gradient
        eps_sh, eps_ns = rho * _unit(g), rho_ns * _unit(g_ns)
        moved = dict(theta)
        off = 0
        for k in shared:
            n = theta[k].numel()
            moved[k] = (theta[k] + eps_sh[off : off + n].view_as(theta[k])).requires_grad_()
            off += n
        off = 0
        for k in head:
            n = theta[k].numel()
            moved[k] = (theta[k] + eps_ns[off : off + n].view_as(theta[k])).requires_grad_()
            off += n
        wrt = [*shared, *head]
        sam = torch.autograd.grad(losses_at(moved)[t.name], [moved[k] for k in wrt])
        g_sam = torch.cat([s.reshape(-1) for s in sam[: len(shared)]])
        sam_heads.update(dict(zip(head, sam[len(shared) :], strict=True)))
        rows_g.append(g)
        rows_h.append(g_sam - g)  # line 5
    jg, jh = torch.stack(rows_g), torch.stack(rows_h)
    assert float(jh.abs().max()) > 1e-3  # the flat part is not negligible here
    expected = weights_fn(jg @ jg.T) @ jg + weights_fn(jh @ jh.T) @ jh  # lines 7-8

    weights = build_balancer("f-mtl", TASKS, base=base, rho=rho, rho_specific=rho_ns).backward(engine.losses, engine)
    got = torch.cat([names[k].grad.reshape(-1) for k in shared])
    assert torch.allclose(got, expected, atol=1e-9, rtol=1e-7)
    for k, g in sam_heads.items():  # line 9: each head gets its own task's SAM gradient
        assert torch.allclose(names[k].grad, g, atol=1e-10, rtol=1e-8), k
    assert [weights[t.name] for t in TASKS] == pytest.approx(weights_fn(jg @ jg.T).tolist(), abs=1e-9)


# ------------------------------------------------------------------------------ parameters and state
@pytest.mark.parametrize(
    "model,spec", [("shared-bottom", TABULAR), ("mmoe", TABULAR), ("ple", TABULAR), ("shared-bottom", IMAGE)]
)
def test_parameters_are_restored_bit_for_bit(model: str, spec: InputSpec) -> None:
    st = tiny_step(model, spec, reforward=True)
    before = {k: v.clone() for k, v in st.net.state_dict().items()}
    build_balancer("f-mtl", TASKS, rho=0.5).backward(st.losses, st.engine)
    after = st.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is not None for p in st.net.parameters())


def test_parameters_are_restored_when_the_perturbed_pass_fails() -> None:
    st = tiny_step(reforward=True)
    before = {k: v.clone() for k, v in st.net.state_dict().items()}
    seen: list[bool] = []

    def failing() -> dict[str, torch.Tensor]:
        seen.append(any(not torch.equal(before[k], v) for k, v in st.net.state_dict().items()))
        raise RuntimeError("boom")

    st.engine.reforward = failing
    with pytest.raises(RuntimeError, match="boom"):
        build_balancer("f-mtl", TASKS).backward(st.losses, st.engine)
    assert seen == [True]  # it failed while perturbed ...
    assert all(torch.equal(before[k], v) for k, v in st.net.state_dict().items())  # ... and was put back


def test_task_without_labels_is_not_perturbed_and_gives_finite_gradients() -> None:
    st = tiny_step(reforward=True, no_labels_for="b")
    calls: list[int] = []
    rerun = st.engine.reforward
    assert rerun is not None

    def counted() -> dict[str, torch.Tensor]:
        calls.append(1)
        return rerun()

    st.engine.reforward = counted
    weights = build_balancer("f-mtl", TASKS, base="mgda", rho=0.5).backward(st.losses, st.engine)
    assert len(calls) == 2  # tasks a and c only
    assert all(torch.isfinite(g).all() for g in _grads(st.net))
    assert weights["b"] == 0.0 and all(math.isfinite(v) for v in weights.values())
    for p in st.net.task_parameters("b"):
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
    assert float(sum(float(p.grad.abs().sum()) for p in st.shared)) > 0


def test_base_state_is_in_the_checkpoint() -> None:
    bal = build_balancer("f-mtl", TASKS, base="gradvac", rho=0.2)
    st = tiny_step(reforward=True)
    bal.backward(st.losses, st.engine)
    state = bal.state_dict()
    assert {"base.targets", "flat_base.targets"} <= set(state)
    # the two streams (task and flat gradients) keep separate targets
    assert not torch.equal(state["base.targets"], state["flat_base.targets"])
    other = build_balancer("f-mtl", TASKS, base="gradvac", rho=0.2)
    other.load_state_dict(state)
    assert torch.equal(other.flat_base.targets, bal.flat_base.targets)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("base,kind", [("equal", "loss-level"), ("nope", "unknown"), ("mgda-ub", "representation")])
def test_bad_base_is_a_one_line_error_listing_valid_bases(base: str, kind: str) -> None:
    with pytest.raises(ValueError) as err:
        build_balancer("f-mtl", TASKS, base=base)
    msg = str(err.value)
    assert "\n" not in msg and f"'{base}'" in msg and kind in msg
    assert msg.endswith("valid gradient-level bases: " + ", ".join(BASES))


def test_other_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="f-mtl itself"):
        build_balancer("f-mtl", TASKS, base="f-mtl")
    with pytest.raises(ValueError, match="non-negative"):
        build_balancer("f-mtl", TASKS, rho=-0.1)
    with pytest.raises(ValueError, match="has no parameter"):
        build_balancer("f-mtl", TASKS, base="cagrad", base_params={"nope": 1})
    assert build_balancer("f-mtl", TASKS, base="cagrad", base_params={"c": 0.1}).base.c == 0.1


def test_without_reforward_is_a_clear_error() -> None:
    st = tiny_step()
    with pytest.raises(RuntimeError, match=r"needs engine\.reforward"):
        build_balancer("f-mtl", TASKS).backward(st.losses, st.engine)


def test_registry_entry() -> None:
    entry = BALANCERS["f-mtl"]
    assert entry.cls is FMTL and entry.cls.level == "gradient" and "2211.13723" in entry.paper
    assert entry.defaults["base"] == "upgrad" and entry.defaults["rho"] == 0.05


# ------------------------------------------------------------------------------ through the trainer
def _bundle() -> DataBundle:
    def split(n: int, seed: int) -> TaskTensors:
        g = torch.Generator().manual_seed(seed)
        num = torch.randn(n, 3, generator=g)
        cat = torch.randint(0, 4, (n, 1), generator=g)
        a = (num[:, 0] - num[:, 1] > 0).float()
        c = num[:, 0] + 0.5 * num[:, 2] + 0.1 * torch.randn(n, generator=g)
        has_c = torch.rand(n, generator=g) < 0.7
        return TaskTensors(
            {"num": num, "cat": cat},
            {"a": a, "c": torch.where(has_c, c, torch.nan)},
            {"a": torch.ones(n, dtype=torch.bool), "c": has_c},
        )

    tasks = [TASKS[0], TASKS[2]]
    return DataBundle("toy", tasks, InputSpec("tabular", n_numeric=3, cardinalities=(4,)), split(256, 1), split(64, 2))


def _trainer(balancer: object) -> Trainer:
    data = _bundle()
    torch.manual_seed(0)
    net = build_model("shared-bottom", data.tasks, data.input_spec)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=3e-3, patience=None)
    return Trainer(net, data, balancer, cfg, progress=False)  # type: ignore[arg-type]


def test_trainer_step_uses_the_perturbed_pass() -> None:
    data = _bundle()
    batch = data.train.take(torch.arange(64))
    tasks = list(data.tasks)
    after = {}
    for key, bal in {
        "upgrad": build_balancer("upgrad", tasks),
        "rho0": build_balancer("f-mtl", tasks, rho=0.0),
        "rho": build_balancer("f-mtl", tasks, rho=0.5),
    }.items():
        tr = _trainer(bal)
        tr.step(batch)
        after[key] = torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()])
    assert torch.allclose(after["rho0"], after["upgrad"], atol=1e-7)
    assert not torch.allclose(after["rho"], after["upgrad"], atol=1e-5)


def test_trains_through_the_trainer() -> None:
    res = _trainer("f-mtl").fit()
    assert all(math.isfinite(v) for m in res.val.values() for v in m.values())
    assert all(math.isfinite(w) for h in res.history for w in h["weights"].values())
    first, last = res.history[0]["train_loss"], res.history[-1]["train_loss"]
    assert sum(last.values()) < sum(first.values())
