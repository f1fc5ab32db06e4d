"""Architectures: shapes, the declared parameter split and its defining property, gates, registry."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from polytask.data._tensors import InputSpec
from polytask.nn import (
    MLP,
    MODELS,
    PLE,
    LeNetTrunk,
    MultiTaskModel,
    TabularEmbedding,
    TaskHead,
    auto_embedding_dim,
    build_model,
    make_expert,
    make_stem,
)
from polytask.nn.architectures import SHARED_GATE
from polytask.tasks import Task

TASKS = [Task("b", "binary"), Task("m", "multiclass", n_classes=3), Task("r", "regression")]
SPECS = {
    "tabular": InputSpec("tabular", n_numeric=3, cardinalities=(4, 7)),
    "image": InputSpec("image", channels=1, height=28, width=28),
}
# small widths keep the suite fast; image models keep their LeNet trunks
SMALL = {
    "single": {"hidden": (8,), "tower_hidden": (4,)},
    "shared-bottom": {"hidden": (8,), "tower_hidden": (4,)},
    "mmoe": {"n_experts": 3, "expert_hidden": (8,), "tower_hidden": (4,)},
    "cgc": {"n_shared_experts": 2, "n_task_experts": 1, "expert_hidden": (8,), "tower_hidden": (4,)},
    "ple": {"n_shared_experts": 2, "n_task_experts": 1, "expert_hidden": (8,), "tower_hidden": (4,)},
    "home": {
        "n_shared_experts": 1,
        "n_group_experts": 1,
        "n_task_experts": 1,
        "expert_hidden": (8,),
        "tower_hidden": (4,),
        "feature_gate_rank": 2,
    },
    "dselect-k": {"n_experts": 3, "k": 2, "expert_hidden": (8,), "tower_hidden": (4,)},
    "cross-stitch": {"hidden": (8,), "tower_hidden": (4,)},
    "apem": {"emb_dim": 4, "n_groups": 2, "n_layers": 1, "n_heads": 1, "tower_hidden": (4,)},
    "dtrn": {"emb_dim": 4, "task_emb_dim": 4, "n_heads": 1, "tower_hidden": (4,)},
    # batch_norm off: narrower widths' switchable BN gets no gradient from the full-width task losses
    "controllable": {
        "widths": (0.5, 1.0),
        "conv_channels": (4, 8),
        "hidden": (8,),
        "decoder_hidden": (4,),
        "batch_norm": False,
    },
    "mtan": {"widths": (4, 8), "blocks_per_stage": 1},
    "resnet-shared-bottom": {"widths": (4, 8), "blocks_per_stage": 1},
    "task-expert": {"widths": (4, 8), "blocks_per_stage": 1, "n_experts": 2, "expert_dim": 4},
    "mod-squad": {"dim": 8, "depth": 2, "heads": 2, "patch_size": 7, "n_experts": 3, "attn_experts": 3},
    "m3vit": {"dim": 8, "depth": 2, "heads": 2, "patch_size": 7, "n_experts": 3},
    "multitab": {"dim": 8, "n_blocks": 2, "n_heads": 2, "ffn_dim": 8},
}
#: Models that read only one kind of input (the others get a one-line error, tested in their files).
ONLY = {
    "apem": ("tabular",),
    "dtrn": ("tabular",),
    "multitab": ("tabular",),
    "mtan": ("image",),
    "resnet-shared-bottom": ("image",),
    "task-expert": ("image",),
}
#: Models whose tasks must be a conversion funnel (binary steps): the generic b/m/r tasks do not
#: apply; their contract tests live in the named file.
ELSEWHERE = {"esmm": "test_nn_funnel.py", "aitm": "test_nn_funnel.py", "text": "test_text_cli.py"}
GATED = ["mmoe", "cgc", "ple"]
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


def _losses(model: MultiTaskModel, kind: str) -> dict[str, torch.Tensor]:
    preds = model(_inputs(kind))
    y = _labels()
    return {t.name: t.loss(preds[t.name], y[t.name]) for t in TASKS}


CASES = [(name, kind) for name in SMALL for kind in ONLY.get(name, tuple(SPECS))]


def test_every_registered_model_is_tested() -> None:
    assert sorted(MODELS) == sorted([*SMALL, *ELSEWHERE])
    here = Path(__file__).parent
    for name, file in ELSEWHERE.items():
        assert f'"{name}"' in (here / file).read_text(), f"{name} is not tested in {file}"


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_output_shapes(name: str, kind: str) -> None:
    preds = _build(name, kind)(_inputs(kind))
    assert {k: tuple(v.shape) for k, v in preds.items()} == {"b": (N,), "m": (N, 3), "r": (N,)}


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_default_hyperparameters_build_and_run(name: str, kind: str) -> None:
    torch.manual_seed(0)
    preds = build_model(name, TASKS, SPECS[kind])(_inputs(kind, n=2))
    assert preds["m"].shape == (2, 3)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_summed_loss_gives_finite_gradient_to_every_parameter(name: str, kind: str) -> None:
    model = _build(name, kind)
    sum(_losses(model, kind).values()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_parameter_split_is_a_partition(name: str, kind: str) -> None:
    model = _build(name, kind)
    every = [n for n, _ in model.named_parameters()]
    per_task = [set(model.task_parameter_names(t)) for t in model.task_names]
    shared = set(model.shared_parameter_names())
    assert all(per_task), "each task owns at least its tower"
    assert sum(len(s) for s in per_task) + len(shared) == len(every)
    assert set().union(*per_task, shared) == set(every)
    for i, a in enumerate(per_task):
        assert not a & shared
        for b in per_task[i + 1 :]:
            assert not a & b
    with pytest.raises(KeyError, match="unknown task"):
        model.task_parameter_names("nope")


def _grads(loss: torch.Tensor, model: MultiTaskModel) -> dict[str, torch.Tensor | None]:
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return dict(zip(names, grads, strict=True))


def _is_zero(g: torch.Tensor | None) -> bool:
    return g is None or not g.any()


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_task_loss_never_reaches_other_tasks_parameters(name: str, kind: str) -> None:
    model = _build(name, kind)
    losses = _losses(model, kind)
    for t in model.task_names:
        grads = _grads(losses[t], model)
        own = model.task_parameter_names(t)
        assert any(not _is_zero(grads[n]) for n in own), t
        for other in model.task_names:
            if other != t:
                assert all(_is_zero(grads[n]) for n in model.task_parameter_names(other)), (t, other)


@pytest.mark.parametrize("kind", SPECS)
def test_single_task_shares_nothing(kind: str) -> None:
    model = _build("single", kind)
    assert model.independent
    assert model.shared_parameter_names() == []
    _, reps = model.forward_with_representation(_inputs(kind))
    assert reps == []
    losses = _losses(model, kind)
    for t in model.task_names:
        own = set(model.task_parameter_names(t))
        grads = _grads(losses[t], model)
        assert all(_is_zero(g) for n, g in grads.items() if n not in own), t


@pytest.mark.parametrize(("name", "kind"), [c for c in CASES if c[0] != "single"])
def test_representation_is_in_the_graph(name: str, kind: str) -> None:
    model = _build(name, kind)
    assert not model.independent
    preds, reps = model.forward_with_representation(_inputs(kind))
    assert reps and all(r.shape[0] == N for r in reps)
    y = _labels()
    nonzero = []
    for t in TASKS:
        grads = torch.autograd.grad(t.loss(preds[t.name], y[t.name]), reps, retain_graph=True)
        assert all(g.shape == r.shape and torch.isfinite(g).all() for g, r in zip(grads, reps, strict=True)), t.name
        nonzero.append(all(g.any() for g in grads))
    assert any(nonzero)  # a tiny tower may have all its ReLUs off for one task, not for all


def test_representation_shapes() -> None:
    x = _inputs("tabular")
    assert _build("shared-bottom", "tabular").forward_with_representation(x)[1][0].shape == (N, 8)
    assert _build("mmoe", "tabular").forward_with_representation(x)[1][0].shape == (N, 3, 8)
    assert _build("ple", "tabular").forward_with_representation(x)[1][0].shape == (N, 2, 8)
    image_mmoe = _build("mmoe", "image", expert_hidden=())
    assert image_mmoe.forward_with_representation(_inputs("image"))[1][0].shape == (N, 3, 50)


@pytest.mark.parametrize(("name", "kind"), [(n, k) for n in GATED for k in SPECS])
def test_gates_are_distributions(name: str, kind: str) -> None:
    model = _build(name, kind)
    levels = [-1] if name != "ple" else [0, 1]
    for level in levels:
        gates = model.gate_weights(_inputs(kind)) if name == "mmoe" else model.gate_weights(_inputs(kind), level)
        assert set(TASKS_NAMES := model.task_names) <= set(gates)
        for g in gates.values():
            assert (g >= 0).all()
            torch.testing.assert_close(g.sum(dim=1), torch.ones(N))
        expected = {"mmoe": 3, "cgc": 3, "ple": 3}[name]
        assert all(gates[t].shape == (N, expected) for t in TASKS_NAMES)
    if name == "ple":
        assert model.gate_weights(_inputs(kind), 0)[SHARED_GATE].shape == (N, 3 * 1 + 2)
        assert SHARED_GATE not in model.gate_weights(_inputs(kind), -1)


def test_ple_lower_level_task_experts_are_shared() -> None:
    # the shared gate of level 1 passes every task's level-1 experts on to all tasks
    model = _build("ple", "tabular", n_levels=3)
    shared = model.shared_parameter_names()
    assert any(n.startswith("levels.0.task_experts.") for n in shared)
    assert any(n.startswith("levels.1.task_experts.") for n in shared)
    assert not any(n.startswith(("levels.2.task_experts.", "levels.0.task_gates.")) for n in shared)
    own = set(model.task_parameter_names("m"))
    assert {f"levels.{lvl}.task_gates.1.linear.weight" for lvl in range(3)} <= own
    assert any(n.startswith("levels.2.task_experts.1.") for n in own)


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_deterministic_under_manual_seed(name: str, kind: str) -> None:
    a, b = _build(name, kind, seed=3), _build(name, kind, seed=3)
    x = _inputs(kind)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    for t in a.task_names:
        assert torch.equal(a(x)[t], b(x)[t])
    c = _build(name, kind, seed=4)
    assert not torch.equal(a(x)["m"], c(x)["m"])


@pytest.mark.parametrize("name", GATED)
def test_diagnostics_record_eval_gate_usage(name: str) -> None:
    model = _build(name, "tabular")
    assert not any("usage" in k or "count" in k for k in model.state_dict())
    model.train()
    model(_inputs("tabular"))
    assert model.diagnostics()["expert_usage"] == {}, "training passes are not recorded"
    model.eval()
    with torch.no_grad():
        model(_inputs("tabular", seed=1))
        model(_inputs("tabular", n=3, seed=2))
    d = model.diagnostics()
    assert set(d["expert_usage"]) == set(model.task_names) == set(d["gate_entropy"])
    for t, shares in d["expert_usage"].items():
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-6)
        assert 0 <= d["gate_entropy"][t] <= math.log(len(shares)) + 1e-6
    # the mean over all recorded rows equals the mean of the gate weights
    x = {k: torch.cat([_inputs("tabular", seed=1)[k], _inputs("tabular", n=3, seed=2)[k]]) for k in ("num", "cat")}
    with torch.no_grad():
        expected = model.gate_weights(x) if name == "mmoe" else model.gate_weights(x, -1)
    model.reset_diagnostics()
    with torch.no_grad():
        model(x)
    for t in model.task_names:
        torch.testing.assert_close(torch.tensor(model.diagnostics()["expert_usage"][t]), expected[t].mean(0))
    model.reset_diagnostics()
    assert model.diagnostics()["expert_usage"] == {}


@pytest.mark.parametrize("name", GATED)
def test_expert_zero_share_counts_dead_units(name: str) -> None:
    """A dead expert (every ReLU output zero) reports share 1; the others their true zero share."""
    model = _build(name, "tabular").eval()
    experts = model.experts if name == "mmoe" else model.levels[-1].shared_experts
    last = [m for m in experts[0].modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.bias.fill_(-1e6)  # pre-activations far below zero: a collapsed expert
        x = _inputs("tabular", n=7, seed=3)
        model(x)
        h = model.stem(x)
        live = experts[1](h) if name == "mmoe" else None
    zeros = model.diagnostics()["expert_zero_share"]
    shares = zeros["experts"]
    dead = 0 if name == "mmoe" else model.n_task_experts * len(model.task_names)  # shared ones come last
    assert shares[dead] == 1.0
    assert all(0.0 <= v <= 1.0 for v in shares)
    if live is not None:
        assert math.isclose(shares[1], float((live == 0).double().mean()), rel_tol=1e-9)
    model.reset_diagnostics()
    assert "expert_zero_share" not in model.diagnostics()


def test_ple_diagnostics_cover_every_level() -> None:
    model = _build("ple", "tabular").eval()
    with torch.no_grad():
        model(_inputs("tabular"))
    d = model.diagnostics()
    assert len(d["levels"]) == 2 and SHARED_GATE in d["levels"][0]["expert_usage"]
    assert SHARED_GATE not in d["expert_usage"]
    assert d["expert_names"]["b"] == ["b:0", "shared:0", "shared:1"]


def test_build_model_errors_name_the_valid_choices() -> None:
    with pytest.raises(KeyError, match=r"available: .*mmoe.*single"):
        build_model("moe-typo", TASKS, SPECS["tabular"])
    with pytest.raises(ValueError, match=r"no parameter \['n_expert'\]; valid: .*n_experts"):
        build_model("mmoe", TASKS, SPECS["tabular"], n_expert=4)
    with pytest.raises(ValueError, match=r"valid: .*n_levels"):
        build_model("ple", TASKS, SPECS["tabular"], levels=2)
    assert "n_levels" not in MODELS["cgc"].defaults
    assert isinstance(build_model("cgc", TASKS, SPECS["tabular"]), PLE)


def test_lenet_trunk_shape_and_parameter_count() -> None:
    trunk = LeNetTrunk(1, 28, 28)
    assert trunk(torch.rand(2, 1, 28, 28)).shape == (2, 50) and trunk.out_dim == 50
    # conv1: 10*1*9*9 + 10 = 820; conv2: 20*10*5*5 + 20 = 5020;
    # 28 -> conv9 20 -> pool 10 -> conv5 6 -> pool 3, so fc: 20*3*3*50 + 50 = 9050; total 14890
    assert sum(p.numel() for p in trunk.parameters()) == 820 + 5020 + 9050 == 14890
    # three channels, 36x36 (Pareto-MTL's size): 36 -> 28 -> 14 -> 10 -> 5, fc input 20*5*5 = 500
    big = LeNetTrunk(3, 36, 36)
    assert big(torch.rand(2, 3, 36, 36)).shape == (2, 50)
    assert big.fc.in_features == 500 and big.conv1.weight.shape == (10, 3, 9, 9)
    with pytest.raises(ValueError, match="at least 20x20"):
        LeNetTrunk(1, 16, 16)


def test_image_models_share_one_lenet_trunk() -> None:
    model = _build("shared-bottom", "image")
    shared = sum(p.numel() for p in model.shared_parameters())
    assert shared == 14890 + 50 * 8 + 8  # LeNet + the (8,) fc layer the test config adds


def test_tabular_embedding() -> None:
    # fastai rule: round(1.6 * c**0.56), capped at 16
    assert [auto_embedding_dim(c) for c in (1, 2, 10, 50, 1000)] == [2, 2, 6, 14, 16]
    emb = TabularEmbedding(3, (4, 7))
    assert emb.out_dim == 3 + auto_embedding_dim(4) + auto_embedding_dim(7)
    x = _inputs("tabular")
    out = emb(x)
    assert out.shape == (N, emb.out_dim)
    torch.testing.assert_close(out[:, :3], x["num"])
    assert TabularEmbedding(0, (5,), emb_dim=4)({"cat": torch.zeros(2, 1, dtype=torch.long)}).shape == (2, 4)
    assert TabularEmbedding(2, ())({"num": torch.ones(2, 2)}).shape == (2, 2)
    with pytest.raises(ValueError, match="one numeric or categorical"):
        TabularEmbedding(0, ())
    with pytest.raises(ValueError, match="2 entries for 1"):
        TabularEmbedding(0, (5,), emb_dim=(2, 3))


def test_mlp_heads_stems_and_experts() -> None:
    mlp = MLP(5, (7, 3), dropout=0.1, activation="gelu", batch_norm=True)
    assert mlp.out_dim == 3 and mlp(torch.randn(4, 5)).shape == (4, 3)
    assert MLP(5).out_dim == 5
    with pytest.raises(ValueError, match=r"valid: .*relu"):
        MLP(5, (3,), activation="swishy")
    assert TaskHead(5, TASKS[0], hidden=(4,))(torch.randn(2, 5)).shape == (2,)
    assert TaskHead(5, TASKS[1])(torch.randn(2, 5)).shape == (2, 3)
    image_stem = make_stem(SPECS["image"])
    assert image_stem.out_dim == 784
    assert make_expert(SPECS["image"], 784, ()).out_dim == 50
    assert make_expert(SPECS["image"], 784, (16,)).out_dim == 16
    assert make_expert(SPECS["tabular"], 9, (16, 4)).out_dim == 4


def test_auto_hyperparameters_depend_on_input_kind() -> None:
    tab = build_model("shared-bottom", TASKS, SPECS["tabular"])
    assert [m.out_features for m in tab.trunk.modules() if isinstance(m, torch.nn.Linear)] == [128, 64]
    img = build_model("shared-bottom", TASKS, SPECS["image"])
    assert isinstance(img.trunk, LeNetTrunk)
    assert img.towers[0].tower.out_dim == 50 and tab.towers[0].tower.out_dim == 32
    assert build_model("mmoe", TASKS, SPECS["tabular"], expert_hidden=16).experts[0].out_dim == 16
    with pytest.raises(ValueError, match="'auto'"):
        build_model("mmoe", TASKS, SPECS["tabular"], expert_hidden="big")
