"""Feature-interaction architectures: APEM (group transformer + pattern selector) and DTRN
(hypernetwork-conditioned transformer + per-task SENet refinement)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from polytask.data import InputSpec, load_dataset
from polytask.nn import MultiTaskModel, build_model
from polytask.nn.architectures.apem import APEM, FieldTokens, field_groups
from polytask.nn.architectures.dtrn import DTRN, ConditionalTransformerLayer
from polytask.tasks import Task

TASKS = [Task("b", "binary"), Task("m", "multiclass", n_classes=3), Task("r", "regression")]
SPEC = InputSpec("tabular", n_numeric=3, cardinalities=(4, 7, 2))
N_FIELDS = 6
SMALL = {
    "apem": {"emb_dim": 8, "n_groups": 2, "n_layers": 1, "tower_hidden": (8,)},
    "dtrn": {"emb_dim": 8, "task_emb_dim": 4, "tower_hidden": (8,)},
}
NAMES = list(SMALL)
N = 10


def _inputs(n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cats = [torch.randint(0, c, (n,), generator=g) for c in SPEC.cardinalities]
    return {"num": torch.randn(n, SPEC.n_numeric, generator=g), "cat": torch.stack(cats, dim=1)}


def _labels(n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "b": torch.randint(0, 2, (n,), generator=g).float(),
        "m": torch.randint(0, 3, (n,), generator=g),
        "r": torch.randn(n, generator=g),
    }


def _build(name: str, seed: int = 0, **params: object) -> MultiTaskModel:
    torch.manual_seed(seed)
    return build_model(name, TASKS, SPEC, **{**SMALL[name], **params})


def _losses(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    preds = model(_inputs())
    y = _labels()
    return {t.name: t.loss(preds[t.name], y[t.name]) for t in TASKS}


@pytest.mark.parametrize("name", NAMES)
def test_shapes_representation_and_finite_gradient_for_every_parameter(name: str) -> None:
    model = _build(name)
    assert isinstance(model, {"apem": APEM, "dtrn": DTRN}[name])
    preds, reps = model.forward_with_representation(_inputs())
    assert {k: tuple(v.shape) for k, v in preds.items()} == {"b": (N,), "m": (N, 3), "r": (N,)}
    assert [tuple(r.shape) for r in reps] == [(N, N_FIELDS, 8)]
    y = _labels()
    for t in TASKS:  # every task's loss reaches the shared representation
        (g,) = torch.autograd.grad(t.loss(preds[t.name], y[t.name]), reps, retain_graph=True)
        assert torch.isfinite(g).all() and g.any(), t.name
    sum(_losses(model).values()).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", NAMES)
def test_parameter_split_is_a_partition_and_task_losses_stay_out_of_others(name: str) -> None:
    model = _build(name)
    every = [n for n, _ in model.named_parameters()]
    owned = {t: model.task_parameter_names(t) for t in model.task_names}
    shared = model.shared_parameter_names()
    assert all(owned.values())
    assert sorted([n for names in owned.values() for n in names] + shared) == sorted(every)
    params = dict(model.named_parameters())
    losses = _losses(model)
    for t in model.task_names:
        own = torch.autograd.grad(losses[t], [params[n] for n in owned[t]], retain_graph=True, allow_unused=True)
        assert any(g is not None and g.any() for g in own), t
        others = [params[n] for o in model.task_names if o != t for n in owned[o]]
        grads = torch.autograd.grad(losses[t], others, retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in grads), t
    with pytest.raises(KeyError, match="unknown task"):
        model.task_parameter_names("nope")


@pytest.mark.parametrize("name", NAMES)
def test_defaults_build_by_name_and_errors_are_one_line(name: str) -> None:
    torch.manual_seed(0)
    assert build_model(name, TASKS, SPEC)(_inputs(n=2))["m"].shape == (2, 3)
    with pytest.raises(ValueError, match=rf"^{name} needs tabular input \(feature fields\), got image input$"):
        build_model(name, TASKS, InputSpec("image", channels=1, height=28, width=28))
    with pytest.raises(ValueError, match=r"^emb_dim \(8\) must be a positive multiple of n_heads \(3\)$"):
        _build(name, n_heads=3)
    with pytest.raises(ValueError, match=r"^n_layers must be >= 1, got 0$"):
        _build(name, n_layers=0)
    with pytest.raises(ValueError, match="has no parameter"):
        _build(name, experts=2)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_manual_seed(name: str) -> None:
    a, b, c = _build(name, seed=3), _build(name, seed=3), _build(name, seed=4)
    x = _inputs()
    assert all(torch.equal(a(x)[t], b(x)[t]) for t in a.task_names)
    assert not torch.equal(a(x)["m"], c(x)["m"])


def test_field_tokens_one_per_column() -> None:
    torch.manual_seed(0)
    tokens = FieldTokens(SPEC, 4)
    x = _inputs()
    z = tokens(x)
    assert z.shape == (N, N_FIELDS, 4)
    torch.testing.assert_close(z[:, 1], x["num"][:, 1:2] * tokens.num_weight[1] + tokens.num_bias[1])
    torch.testing.assert_close(z[:, 3 + 2], tokens.embeddings[2](x["cat"][:, 2]))
    only_cat = FieldTokens(InputSpec("tabular", cardinalities=(3,)), 4)
    assert only_cat({"num": torch.zeros(2, 0), "cat": torch.ones(2, 1, dtype=torch.long)}).shape == (2, 1, 4)


# ----------------------------------------------------------------------------- APEM
def test_field_groups_split_contiguously() -> None:
    assert field_groups(6, 2) == [[0, 1, 2], [3, 4, 5]]
    assert field_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert field_groups(3, 8) == [[0], [1], [2]]
    with pytest.raises(ValueError, match=r"^n_groups must be >= 1, got 0$"):
        field_groups(3, 0)


def test_apem_attention_stays_within_groups() -> None:
    model = _build("apem", n_groups=2, n_layers=2).eval()
    assert model.groups == [[0, 1, 2], [3, 4, 5]]
    model.se = nn.Identity()  # the SE weights read every field; look at the transformer alone
    x = _inputs()
    y = {k: v.clone() for k, v in x.items()}
    y["num"][:, 0] += 3.0  # a field of the first group
    with torch.no_grad():
        a, b = model.patterns(x), model.patterns(y)
    assert not torch.allclose(a[:, :3], b[:, :3])
    torch.testing.assert_close(a[:, 3:], b[:, 3:])
    full = _build("apem", n_groups=1).eval()
    assert not full.attn_mask.any()


def test_apem_selection_weights_are_task_specific_and_recorded_in_eval() -> None:
    model = _build("apem")
    assert not any("sum" in k or "count" in k or "mask" in k for k in model.state_dict())
    x = _inputs()
    weights = model.selection_weights(x)
    for w in weights.values():
        assert w.shape == (N, N_FIELDS) and bool((w > 0).all())
        torch.testing.assert_close(w.mean(1), torch.ones(N))
    assert not torch.allclose(weights["b"], weights["m"])
    model.train()
    model(x)
    assert model.diagnostics() == {}
    model.eval()
    with torch.no_grad():
        model(x)
    d = model.diagnostics()
    for t in model.task_names:
        torch.testing.assert_close(
            torch.tensor(d["pattern_selection"][t], dtype=torch.float64), weights[t].detach().double().mean(0)
        )
    assert len(d["field_se_weight"]) == N_FIELDS and all(0 < v < 1 for v in d["field_se_weight"])
    model.reset_diagnostics()
    assert model.diagnostics() == {}


# ----------------------------------------------------------------------------- DTRN
def test_conditional_layer_with_unit_norms_is_a_post_norm_transformer_layer() -> None:
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(8, 2, 16, 0.0, batch_first=True).eval()
    layer = ConditionalTransformerLayer(8, 2, 16).eval()
    layer.attn.load_state_dict(ref.self_attn.state_dict())
    layer.ffn[0].load_state_dict(ref.linear1.state_dict())
    layer.ffn[3].load_state_dict(ref.linear2.state_dict())
    x = torch.randn(5, 6, 8)
    unit = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 4, 1).expand(5, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, unit), ref(x))
        # per-sample norms: scaling the last gain and shifting the last bias acts on the output
        norms = unit.clone()
        norms[0, 2], norms[0, 3] = 2.0, 0.5
        out = layer(x, norms)
        torch.testing.assert_close(out[0], 2.0 * ref(x)[0] + 0.5)
        torch.testing.assert_close(out[1:], ref(x)[1:])


def test_dtrn_bottoms_are_task_specific_through_the_hypernetwork() -> None:
    model = _build("dtrn")
    e, refined = model.bottom_representations(_inputs())
    assert e.shape == (N, N_FIELDS, 8)
    assert [tuple(r.shape) for r in refined] == [(N, N_FIELDS + 1, 8)] * 3
    norms = model._norm_parameters()
    assert norms.shape == (3, 1, 4, 8)
    assert not torch.allclose(norms[0], norms[1])  # different task embeddings, different LayerNorms
    # the interest tokens differ per task; with equal task embeddings and TRMs they coincide
    assert not torch.allclose(refined[0][:, -1], refined[1][:, -1])
    with torch.no_grad():
        model.bottoms[1].embedding.copy_(model.bottoms[0].embedding)
        model.bottoms[1].refine.load_state_dict(model.bottoms[0].refine.state_dict())
    _, refined = model.bottom_representations(_inputs())
    torch.testing.assert_close(refined[0], refined[1])
    # the hypernetwork is shared: every task's loss trains it
    losses = _losses(model)
    hyper = list(model.hypernet.parameters())
    for t in model.task_names:
        assert any(g.any() for g in torch.autograd.grad(losses[t], hyper, retain_graph=True)), t


def test_dtrn_diagnostics_report_refinement_weights_in_eval() -> None:
    model = _build("dtrn")
    model(_inputs())
    assert model.diagnostics() == {}
    model.eval()
    with torch.no_grad():
        model(_inputs())
    d = model.diagnostics()["refinement_weight"]
    assert set(d) == {"b", "m", "r"} and all(len(v) == N_FIELDS + 1 for v in d.values())
    model.reset_diagnostics()
    assert model.diagnostics() == {}


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def census(data_dir: Path):
    return load_dataset("census-group1", n_rows=3000, numeric_levels=5)


@pytest.mark.parametrize("name", NAMES)
def test_trains_on_census_with_decreasing_loss(name: str, census) -> None:
    torch.manual_seed(0)
    params = {"emb_dim": 8, "tower_hidden": (32,), **({"n_layers": 1} if name == "apem" else {})}
    model = build_model(name, census.tasks, census.input_spec, **params)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    losses = []
    for _ in range(40):
        batch = census.train.take(torch.randint(0, len(census.train), (128,), generator=g))
        preds = model(batch.x)
        loss = sum(t.loss(preds[t.name], batch.y[t.name], batch.mask[t.name]) for t in census.tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-8:]) < 0.6 * np.mean(losses[:8])
