"""Conversion-funnel models (ESMM, AITM) and the ``funnel-synthetic`` data set."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from polytask.data import DATASETS, InputSpec, load_dataset, split_indices
from polytask.data.funnel import funnel_frame
from polytask.nn import MultiTaskModel, build_model
from polytask.nn.architectures.aitm import AITM, behavioral_expectation_penalty
from polytask.nn.architectures.esmm import ESMM, ctcvr_logits
from polytask.tasks import Task

SPEC = InputSpec("tabular", n_numeric=3, cardinalities=(4, 7))
TASKS = [Task("click", "binary"), Task("conversion", "binary")]
TASKS3 = [*TASKS, Task("purchase", "binary")]
SMALL = {"esmm": {"tower_hidden": (8, 4)}, "aitm": {"tower_hidden": (8, 4)}}
N = 16


def _inputs(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cats = [torch.randint(0, c, (n,), generator=g) for c in SPEC.cardinalities]
    return {"num": torch.randn(n, SPEC.n_numeric, generator=g), "cat": torch.stack(cats, dim=1)}


def _labels(tasks: list[Task], n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    click = (torch.rand(n, generator=g) < 0.5).float()
    conversion = click * (torch.rand(n, generator=g) < 0.5).float()
    purchase = conversion * (torch.rand(n, generator=g) < 0.5).float()
    return {
        k: v
        for k, v in {"click": click, "conversion": conversion, "purchase": purchase}.items()
        if k in {t.name for t in tasks}
    }


def _build(name: str, tasks: list[Task] = TASKS, seed: int = 0, **params: object) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(name, tasks, SPEC, **{**SMALL[name], **params})


def _losses(model: MultiTaskModel, tasks: list[Task]) -> dict[str, torch.Tensor]:
    preds = model(_inputs())
    y = _labels(tasks)
    return {t.name: t.loss(preds[t.name], y[t.name]) for t in tasks}


# ----------------------------------------------------------------------------- data set
def test_funnel_dataset_is_registered_deterministic_and_split() -> None:
    assert "funnel-synthetic" in DATASETS
    a = load_dataset("funnel-synthetic", n_rows=1000, val_fraction=0.2, test_fraction=0.1)
    b = load_dataset("funnel-synthetic", n_rows=1000, val_fraction=0.2, test_fraction=0.1)
    assert [t.name for t in a.tasks] == ["click", "conversion"]
    assert all(t.kind == "binary" for t in a.tasks)
    assert (len(a.train), len(a.val), len(a.test)) == (700, 200, 100)
    assert a.input_spec.n_numeric == 4 and len(a.input_spec.cardinalities) == 4
    for split in ("train", "val", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        for part in ("x", "y", "mask"):
            for k in getattr(sa, part):
                assert torch.equal(getattr(sa, part)[k], getattr(sb, part)[k]), (split, part, k)
    other = load_dataset("funnel-synthetic", n_rows=1000, seed=1, val_fraction=0.2, test_fraction=0.1)
    assert not torch.equal(a.train.x["num"], other.train.x["num"])


def test_funnel_labels_follow_the_funnel() -> None:
    bundle = load_dataset("funnel-synthetic", n_rows=3000, n_steps=3)
    assert [t.name for t in bundle.tasks] == ["click", "conversion", "purchase"]
    for split in (bundle.train, bundle.val, bundle.test):
        y = split.y
        assert bool((y["conversion"] <= y["click"]).all()) and bool((y["purchase"] <= y["conversion"]).all())
        assert all(bool(m.all()) for m in split.mask.values())
        assert 0 < y["purchase"].sum() < y["conversion"].sum() < y["click"].sum() < len(split)
    # the first two steps do not depend on whether a third is simulated
    two, three = funnel_frame(500, 3, 2), funnel_frame(500, 3, 3)
    assert two.equals(three[two.columns])


def test_funnel_frame_matches_its_latent_model() -> None:
    df = funnel_frame(40000, 0, 2)
    for p in ("p_click", "p_cvr"):
        assert df[p].between(0, 1, inclusive="neither").all()
    assert abs(df["click"].mean() - df["p_click"].mean()) < 0.01
    clicked = df[df["click"] == 1]
    assert abs(clicked["conversion"].mean() - clicked["p_cvr"].mean()) < 0.02
    # conversion is rarer on all impressions than among clicks: the selection bias ESMM targets
    assert df["p_cvr"].mean() < clicked["p_cvr"].mean() - 0.03


def test_funnel_dataset_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"^n_steps must be 2 \(click, conversion\) or 3"):
        load_dataset("funnel-synthetic", n_steps=4)
    with pytest.raises(ValueError, match=r"^n_rows must be at least 200"):
        load_dataset("funnel-synthetic", n_rows=50)


# ----------------------------------------------------------------------------- both models
CASES = [("esmm", TASKS), ("aitm", TASKS), ("aitm", TASKS3)]


@pytest.mark.parametrize(("name", "tasks"), CASES)
def test_shapes_and_finite_gradient_for_every_parameter(name: str, tasks: list[Task]) -> None:
    model = _build(name, tasks)
    preds, reps = model.forward_with_representation(_inputs())
    assert {k: tuple(v.shape) for k, v in preds.items()} == {t.name: (N,) for t in tasks}
    assert list(preds) == [t.name for t in tasks]
    assert [tuple(r.shape) for r in reps] == [(N, model.stem.out_dim)]
    loss = sum(_losses(model, tasks).values())
    aux = model.auxiliary_loss()
    (loss + (aux if aux is not None else 0)).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize(("name", "tasks"), CASES)
def test_parameter_split_is_a_partition_and_task_losses_stay_out_of_others(name: str, tasks: list[Task]) -> None:
    model = _build(name, tasks)
    every = [n for n, _ in model.named_parameters()]
    owned = [model.task_parameter_names(t) for t in model.task_names]
    shared = model.shared_parameter_names()
    assert sorted([n for names in owned for n in names] + shared) == sorted(every)
    losses = _losses(model, tasks)
    params = dict(model.named_parameters())
    for t in model.task_names:
        others = [n for o, names in zip(model.task_names, owned, strict=True) if o != t for n in names]
        if not others:  # ESMM's click task: the other task owns nothing
            continue
        grads = torch.autograd.grad(losses[t], [params[n] for n in others], retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in grads), t
    with pytest.raises(KeyError, match="unknown task"):
        model.task_parameter_names("nope")


@pytest.mark.parametrize("name", ["esmm", "aitm"])
def test_built_by_name_with_defaults_and_tabular_only(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, TASKS, SPEC)
    assert isinstance(model, {"esmm": ESMM, "aitm": AITM}[name])
    assert model(_inputs(n=2))["conversion"].shape == (2,)
    with pytest.raises(ValueError, match=f"^{name} needs tabular input"):
        build_model(name, TASKS, InputSpec("image", channels=1, height=28, width=28))


# ----------------------------------------------------------------------------- ESMM
EXTREMES = [-1e4, -300.0, -90.0, -30.0, -17.0, -1.0, -1e-4, 0.0, 1e-4, 1.0, 17.0, 30.0, 90.0, 300.0, 1e4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ctcvr_logit_is_the_product_and_never_exceeds_ctr(dtype: torch.dtype) -> None:
    grid = torch.tensor(EXTREMES, dtype=dtype)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    g = torch.Generator().manual_seed(0)
    a = torch.cat([a.flatten(), torch.randn(5000, generator=g, dtype=dtype) * 20]).requires_grad_()
    b = torch.cat([b.flatten(), torch.randn(5000, generator=g, dtype=dtype) * 20]).requires_grad_()
    ctr, ctcvr = ctcvr_logits(a, b)
    assert torch.isfinite(ctr).all() and torch.isfinite(ctcvr).all()
    torch.testing.assert_close(torch.sigmoid(ctcvr), torch.sigmoid(a) * torch.sigmoid(b), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.sigmoid(ctr), torch.sigmoid(a), atol=1e-6, rtol=0)
    assert bool((ctcvr <= ctr).all()) and bool((torch.sigmoid(ctcvr) <= torch.sigmoid(ctr)).all())
    y = (torch.rand(a.shape, generator=g) < 0.5).to(dtype)
    loss = torch.nn.functional.binary_cross_entropy_with_logits
    (loss(ctr, y) + loss(ctcvr, y)).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_esmm_outputs_satisfy_the_funnel(scale: float) -> None:
    model = _build("esmm")
    with torch.no_grad():  # scale the output layers to push the towers to extreme logits
        model.ctr_tower.out.weight.mul_(scale)
        model.cvr_tower.out.weight.mul_(-scale)
    x = _inputs(n=200, seed=5)
    x["num"] = x["num"] * 10
    preds = model(x)
    ctr, ctcvr, cvr = preds["click"], preds["conversion"], model.predict_cvr(x)
    assert torch.isfinite(ctr).all() and torch.isfinite(ctcvr).all() and bool(((cvr >= 0) & (cvr <= 1)).all())
    torch.testing.assert_close(torch.sigmoid(ctcvr), torch.sigmoid(ctr) * cvr, atol=1e-6, rtol=0)
    assert bool((torch.sigmoid(ctcvr) <= torch.sigmoid(ctr)).all())
    torch.testing.assert_close(torch.sigmoid(model.cvr_logits(x)), cvr)


def test_esmm_task_roles_and_extra_tasks() -> None:
    model = _build("esmm", [Task("ctr", "binary"), Task("r", "regression"), Task("ctcvr", "binary")],
                   ctr_task="ctr", ctcvr_task="ctcvr")  # fmt: skip
    assert model.task_parameter_names("ctr") == []  # the CTR tower also computes pCTCVR
    assert all(n.startswith("cvr_tower.") for n in model.task_parameter_names("ctcvr"))
    assert all(n.startswith("other_towers.0.") for n in model.task_parameter_names("r"))
    assert any(n.startswith("ctr_tower.") for n in model.shared_parameter_names())
    assert list(model(_inputs())) == ["ctr", "r", "ctcvr"]


def test_esmm_rejects_bad_task_names() -> None:
    with pytest.raises(
        ValueError, match=r"^esmm: ctr_task 'clik' is not a task of this model; tasks: click, conversion$"
    ):
        _build("esmm", ctr_task="clik")
    with pytest.raises(
        ValueError, match=r"^esmm: ctcvr_task 'buy' is not a task of this model; tasks: click, conversion$"
    ):
        _build("esmm", ctcvr_task="buy")
    with pytest.raises(ValueError, match=r"^esmm: ctr_task and ctcvr_task must differ"):
        _build("esmm", ctcvr_task="click")
    with pytest.raises(ValueError, match=r"^esmm: ctcvr_task 'conversion' must be a binary task, it is regression$"):
        _build("esmm", [Task("click", "binary"), Task("conversion", "regression")])
    with pytest.raises(ValueError, match="has no parameter"):
        _build("esmm", cvr_task="conversion")


# ----------------------------------------------------------------------------- AITM
def test_calibrator_penalty_is_zero_iff_the_funnel_holds() -> None:
    p1 = torch.tensor([0.9, 0.5, 0.2, 0.1])
    assert behavioral_expectation_penalty([p1, p1 * 0.5, p1 * 0.25]).item() == 0.0
    assert behavioral_expectation_penalty([p1, p1]).item() == 0.0  # equal is allowed
    p2 = torch.tensor([0.3, 0.7, 0.2, 0.4])
    assert behavioral_expectation_penalty([p1, p2]).item() == pytest.approx((0.2 + 0.3) / 4)
    p3 = torch.tensor([0.5, 0.1, 0.1, 0.1])
    assert behavioral_expectation_penalty([p1, p2, p3]).item() == pytest.approx(0.5 / 4 + 0.2 / 4)
    with pytest.raises(ValueError, match=r"^the calibrator needs at least two funnel steps, got 1$"):
        behavioral_expectation_penalty([p1])


@pytest.mark.parametrize("funnel", [None, ["click", "conversion", "purchase"], "purchase, conversion, click"])
def test_aitm_auxiliary_loss_is_the_weighted_calibrator_of_the_last_training_pass(funnel: object) -> None:
    model = _build("aitm", TASKS3, funnel=funnel, calibrator_weight=0.7)
    with torch.no_grad():  # make violations likely whatever the order
        for head in model.heads:
            head.bias.uniform_(-2, 2)
    x = _inputs(n=64)
    model.train()
    preds = model(x)
    order = ["click", "conversion", "purchase"] if funnel is None else model.funnel
    p = [torch.sigmoid(preds[n]) for n in order]
    expected = 0.7 * sum(torch.clamp(later - earlier, min=0).mean() for earlier, later in itertools.pairwise(p))
    aux = model.auxiliary_loss()
    assert aux is not None and aux.requires_grad
    torch.testing.assert_close(aux, expected)
    assert aux.item() > 0
    model.eval()
    with torch.no_grad():
        model(_inputs(n=5, seed=9))
    assert model.auxiliary_loss() is aux, "eval passes leave the training-pass loss alone"
    assert _build("aitm", calibrator_weight=0.0).train().auxiliary_loss() is None


def test_aitm_default_calibrator_weight_and_funnel() -> None:
    model = _build("aitm", TASKS3)
    assert model.calibrator_weight == 0.6
    assert model.funnel == ["click", "conversion", "purchase"]
    # the first step's tower feeds later steps: shared; its output layer is its own
    assert model.task_parameter_names("click") == ["heads.0.weight", "heads.0.bias"]
    assert any(n.startswith(("towers.0.", "ait.")) for n in model.shared_parameter_names())
    assert {n.split(".")[0] for n in model.task_parameter_names("purchase")} == {"heads", "towers", "transfers"}
    weights = model.transfer_weights(_inputs())
    assert set(weights) == {"conversion", "purchase"}
    assert all(bool(((w > 0) & (w < 1)).all()) for w in weights.values())


def test_aitm_rejects_bad_funnels() -> None:
    with pytest.raises(ValueError, match=r"^aitm: unknown task\(s\) \['buy'\] in funnel; tasks: click, conversion$"):
        _build("aitm", funnel=["click", "buy"])
    with pytest.raises(ValueError, match=r"^aitm: a funnel needs at least two steps, got \['click'\]$"):
        _build("aitm", [Task("click", "binary")])
    with pytest.raises(ValueError, match=r"^aitm: funnel lists a task twice"):
        _build("aitm", funnel=["click", "click", "conversion"])
    with pytest.raises(ValueError, match=r"^aitm: funnel must list every task once; missing \['purchase'\]$"):
        _build("aitm", TASKS3, funnel=["click", "conversion"])
    with pytest.raises(ValueError, match=r"^aitm: every funnel step must be a binary task, 'm' is multiclass$"):
        _build("aitm", [Task("click", "binary"), Task("m", "multiclass", n_classes=3)])
    with pytest.raises(ValueError, match=r"^calibrator_weight must be a finite number >= 0"):
        _build("aitm", calibrator_weight=-1.0)


def test_aitm_diagnostics_are_eval_only_and_resettable() -> None:
    model = _build("aitm")
    assert not any("sum" in k or "count" in k for k in model.state_dict())
    model.train()
    model(_inputs())
    assert model.diagnostics() == {}
    model.eval()
    with torch.no_grad():
        preds = model(_inputs())
    d = model.diagnostics()
    share = float((preds["conversion"] > preds["click"]).float().mean())
    assert d["funnel_violation_share"]["conversion"] == pytest.approx(share)
    with torch.no_grad():
        w = model.transfer_weights(_inputs())["conversion"]
    assert d["ait_transfer_weight"]["conversion"] == pytest.approx(float(w.mean()), rel=1e-5)
    model.reset_diagnostics()
    assert model.diagnostics() == {}


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def funnel_bundle():
    return load_dataset("funnel-synthetic", n_rows=4000, n_steps=3)


def _train(model: MultiTaskModel, bundle, steps: int, lr: float = 3e-3) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(steps):
        batch = bundle.train.take(torch.randint(0, len(bundle.train), (128,), generator=g))
        preds = model(batch.x)
        loss = sum(t.loss(preds[t.name], batch.y[t.name], batch.mask[t.name]) for t in bundle.tasks)
        aux = model.auxiliary_loss()
        opt.zero_grad()
        (loss + (aux if aux is not None else 0)).backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_esmm_trains_and_recovers_the_post_click_conversion_rate(funnel_bundle) -> None:
    bundle = funnel_bundle.select_tasks(["click", "conversion"])
    torch.manual_seed(0)
    model = build_model("esmm", bundle.tasks, bundle.input_spec, tower_hidden=(64, 32))
    losses = _train(model, bundle, 150)
    assert np.mean(losses[-15:]) < np.mean(losses[:15]) - 0.1
    # pCVR is never supervised, yet it ranks impressions like the true CVR of the latent model
    _, _, test_rows = split_indices(4000, 0.2, 0.2, 0)
    true_cvr = funnel_frame(4000, 0, 3)["p_cvr"].to_numpy()[test_rows]
    model.eval()
    with torch.no_grad():
        pcvr = model.predict_cvr(bundle.test.x).numpy()
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(pcvr), rank(true_cvr))[0, 1] > 0.5


def test_aitm_trains_and_the_calibrator_reduces_funnel_violations(funnel_bundle) -> None:
    def run(calibrator_weight: float) -> tuple[float, float, float, list[float]]:
        torch.manual_seed(0)
        model = build_model(
            "aitm",
            funnel_bundle.tasks,
            funnel_bundle.input_spec,
            tower_hidden=(32, 16),
            calibrator_weight=calibrator_weight,
        )
        with torch.no_grad():  # start from a model that ranks later steps above earlier ones everywhere
            for i, head in enumerate(model.heads):
                head.bias.fill_(-2.0 + 2.0 * i)

        def violations() -> tuple[float, float]:
            model.eval()
            model.reset_diagnostics()
            with torch.no_grad():
                preds = model(funnel_bundle.val.x)
            share = max(model.diagnostics()["funnel_violation_share"].values())
            return share, model.calibrator_penalty([preds[n] for n in model.funnel]).item()

        share_before, penalty_before = violations()
        losses = _train(model, funnel_bundle, 120)
        share_after, penalty_after = violations()
        assert share_before > 0.9 and penalty_before > 0.5
        return share_after, penalty_after, penalty_before, losses

    share, penalty, penalty_before, losses = run(0.6)
    assert share < 0.2 and penalty < penalty_before / 100
    assert np.mean(losses[-15:]) < np.mean(losses[:15]) - 0.3
    # same start, same batches: the calibrator leaves fewer violations than the task losses alone
    assert penalty < run(0.0)[1]


def test_trainer_adds_the_aitm_calibrator(funnel_bundle) -> None:
    from polytask.train import TrainConfig, Trainer

    torch.manual_seed(0)
    model = build_model("aitm", funnel_bundle.tasks, funnel_bundle.input_spec, tower_hidden=(16, 8))
    with torch.no_grad():
        for i, head in enumerate(model.heads):
            head.bias.fill_(-2.0 + 2.0 * i)
    config = TrainConfig(epochs=2, batch_size=64, max_steps_per_epoch=5, patience=None)
    result = Trainer(model, funnel_bundle, "equal", config, None, progress=False).fit()
    assert result.history[0]["aux_loss"] > 0.1
    assert set(result.test) == {"click", "conversion", "purchase"}
