"""Controllable multi-task architecture: slimmable layers, configurations, cost, distillation, search."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.data import load_dataset
from polytask.data._tensors import InputSpec, TaskTensors
from polytask.nn import build_model
from polytask.nn.architectures.controllable import ControllableMTL, calibrate_batch_norm, profile_configurations
from polytask.nn.slimmable import SlimmableConv2d, SlimmableLinear, SwitchableBatchNorm, active_width
from polytask.tasks import Task
from polytask.train import TrainConfig, Trainer

TASKS = [Task("b", "binary"), Task("m", "multiclass", n_classes=3), Task("r", "regression")]
SPECS = {
    "image": InputSpec("image", channels=1, height=28, width=28),
    "tabular": InputSpec("tabular", n_numeric=3, cardinalities=(4, 7)),
}
# tiny widths keep the suite fast; two ratios give 2**4 = 16 configurations
TINY = {"widths": (0.5, 1.0), "conv_channels": (4, 8), "hidden": (8,), "decoder_hidden": (4,)}
N = 6


def _inputs(kind: str, n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "tabular":
        cats = [torch.randint(0, c, (n,), generator=g) for c in SPECS["tabular"].cardinalities]
        return {"num": torch.randn(n, 3, generator=g), "cat": torch.stack(cats, dim=1)}
    return {"image": torch.rand(n, 1, 28, 28, generator=g)}


def _build(kind: str = "image", seed: int = 0, **params: object) -> ControllableMTL:
    torch.manual_seed(seed)
    model = build_model("controllable", TASKS, SPECS[kind], **{**TINY, **params})
    assert isinstance(model, ControllableMTL)
    return model


def _le(a: dict[str, float], b: dict[str, float]) -> bool:
    return all(a[k] <= b[k] for k in a)


# ----------------------------------------------------------------------------- slimmable layers
def test_slimmable_layers_use_the_first_channels() -> None:
    torch.manual_seed(0)
    lin = SlimmableLinear(6, 4)
    lin.in_ratio, lin.out_ratio = 0.5, 0.5
    x = torch.randn(3, 3)
    torch.testing.assert_close(lin(x), x @ lin.weight[:2, :3].T + lin.bias[:2])
    # a linear layer after flattened (C, H, W) maps takes whole channels: 2 of 4 channels of 2x2 pixels
    flat = SlimmableLinear(16, 5, in_unit=4, slim_out=False)
    flat.in_ratio = 0.5
    assert flat.active() == (8, 5) and flat.macs(0.5, 0.25) == 40
    conv = SlimmableConv2d(4, 6, 3, padding=1)
    conv.in_ratio, conv.out_ratio = 0.5, 0.5
    img = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(
        conv(img), torch.nn.functional.conv2d(img, conv.weight[:3, :2], conv.bias[:3], padding=1)
    )
    assert conv.macs(0.5, 0.5, 5, 5) == 3 * 2 * 9 * 25 and conv.n_parameters(0.5, 0.5) == 3 * 2 * 9 + 3
    bn = SwitchableBatchNorm(6, (0.5, 1.0))
    assert [b.num_features for b in bn.bns] == [3, 6]
    bn.ratio = 0.5
    assert bn(torch.randn(4, 3, 2, 2)).shape == (4, 3, 2, 2)
    assert [active_width(10, r) for r in (0.25, 0.5, 0.75, 1.0)] == [3, 5, 8, 10]
    assert active_width(2, 0.1) == 1
    with pytest.raises(ValueError, match="expects 3 input features"):
        lin(torch.randn(3, 6))


# ----------------------------------------------------------------------------- configurations
@pytest.mark.parametrize("kind", list(SPECS))
def test_shapes_and_gradients_at_every_configuration(kind: str) -> None:
    model = _build(kind).eval()  # eval: each forward runs exactly the chosen configuration
    x = _inputs(kind)
    configs = model.configurations()
    assert len(configs) == 16 and configs[0] == model.smallest_config and configs[-1] == model.full_config
    for cfg in configs:
        model.set_config(cfg)
        model.zero_grad()
        preds, reps = model.forward_with_representation(x)
        assert {k: tuple(v.shape) for k, v in preds.items()} == {"b": (N,), "m": (N, 3), "r": (N,)}
        assert reps[0].shape == (N, active_width(8, cfg["encoder"]))
        sum(p.pow(2).mean() for p in preds.values()).backward()
        # gradients are finite and reach only the active (first) channels of each layer
        enc = model.encoder.fcs[0]
        n_in, n_out = enc.active(cfg["encoder"], cfg["encoder"])
        assert enc.weight.grad is not None and torch.isfinite(enc.weight.grad).all()
        assert enc.weight.grad[:n_out, :n_in].abs().sum() > 0
        assert not enc.weight.grad[n_out:].any() and not enc.weight.grad[:, n_in:].any()
        for task, dec in zip(model.task_names, model.decoders, strict=True):
            w = dec.hidden[0].weight.grad
            assert w is not None and torch.isfinite(w).all()
            assert not w[active_width(4, cfg[task]) :].any(), (cfg, task)
    model.set_config({"m": 0.5})  # keys left out are full width
    assert model.config == {"encoder": 1.0, "b": 1.0, "m": 0.5, "r": 1.0}


def test_narrow_configuration_is_a_prefix_of_the_wide_weights() -> None:
    model = _build().eval()
    narrow = {"encoder": 0.5, "b": 0.5, "m": 0.5, "r": 0.5}
    x = _inputs("image")
    model.set_config(narrow)
    before = {k: v.detach().clone() for k, v in model(x).items()}
    # scramble every weight outside the first channels: the narrow configuration must not notice
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, SlimmableLinear | SlimmableConv2d):
                n_in, n_out = mod.active(0.5, 0.5)
                mod.weight[n_out:] = torch.randn_like(mod.weight[n_out:])
                mod.weight[:, n_in:] = torch.randn_like(mod.weight[:, n_in:])
                if mod.bias is not None:
                    mod.bias[n_out:] = 1.0
    after = model(x)
    for t in model.task_names:
        torch.testing.assert_close(after[t], before[t])
    model.set_config(model.full_config)
    assert not torch.allclose(model(x)["m"], before["m"])
    # and the first channels are the ones it does use
    with torch.no_grad():
        model.encoder.convs[0].weight[0].add_(1.0)
    model.set_config(narrow)
    assert not torch.allclose(model(x)["m"], before["m"])


# ----------------------------------------------------------------------------- cost
def test_count_matches_a_hand_count() -> None:
    model = _build()
    cfg = {"encoder": 0.5, "b": 1.0, "m": 0.5, "r": 0.5}
    # encoder at 0.5: conv1 1->2 (k9, 28->20), conv2 2->4 (k5, 10->6), fc 4*3*3=36 -> 4
    conv1_macs, conv1_params = 2 * 1 * 81 * 20 * 20, 2 * 81 + 2 + 2 * 2  # + switchable BN affine
    conv2_macs, conv2_params = 4 * 2 * 25 * 6 * 6, 4 * 2 * 25 + 4 + 2 * 4
    fc_macs, fc_params = 36 * 4, 36 * 4 + 4 + 2 * 4
    # decoders read 4 features; b at 1.0: 4->4->1; m at 0.5: 4->2->3; r at 0.5: 4->2->1
    dec_macs = (4 * 4 + 4 * 1) + (4 * 2 + 2 * 3) + (4 * 2 + 2 * 1)
    dec_params = (16 + 4 + 4 + 1) + (8 + 2 + 6 + 3) + (8 + 2 + 2 + 1)
    assert model.count(cfg) == {
        "parameters": conv1_params + conv2_params + fc_params + dec_params,
        "flops": conv1_macs + conv2_macs + fc_macs + dec_macs,
    }
    assert model.count(cfg) == {"parameters": 593, "flops": 72188}
    # the full configuration uses every parameter except the narrower widths' batch-norms
    bn_spare = 2 * (2 + 4 + 4)
    assert model.count(model.full_config)["parameters"] == sum(p.numel() for p in model.parameters()) - bn_spare


@pytest.mark.parametrize("kind", list(SPECS))
def test_count_matches_the_executed_layers_and_is_monotone(kind: str) -> None:
    model = _build(kind).eval()
    executed: list[int] = []

    def hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        n_in = mod.active()[0]
        k = mod.kernel_size**2 if isinstance(mod, SlimmableConv2d) else 1
        executed.append(out[0].numel() * n_in * k)  # per sample: outputs x inputs per output

    for mod in model.modules():
        if isinstance(mod, SlimmableLinear | SlimmableConv2d):
            mod.register_forward_hook(hook)
    costs = {}
    for cfg in model.configurations():
        model.set_config(cfg)
        executed.clear()
        with torch.no_grad():
            model(_inputs(kind, n=1))
        costs[tuple(cfg.values())] = model.count(cfg)
        assert sum(executed) == costs[tuple(cfg.values())]["flops"], cfg
    configs = model.configurations()
    for a in configs:
        for b in configs:
            if _le(a, b) and a != b:
                ca, cb = costs[tuple(a.values())], costs[tuple(b.values())]
                assert ca["flops"] < cb["flops"] and ca["parameters"] < cb["parameters"], (a, b)


# ----------------------------------------------------------------------------- distillation
def test_distillation_loss_is_zero_at_full_width_and_positive_otherwise() -> None:
    model = _build().train()
    x = _inputs("image")
    model.set_training_pool([model.full_config])
    model(x)
    aux = model.auxiliary_loss()
    assert aux is not None and float(aux.detach()) == 0.0
    narrow = {"encoder": 0.5, "b": 1.0, "m": 0.5, "r": 1.0}
    model.set_training_pool([narrow])
    model(x)
    aux = model.auxiliary_loss()
    assert model.last_sampled == [narrow]
    assert aux is not None and float(aux.detach()) > 0 and aux.requires_grad
    # the teacher (full width) is detached: the aux loss reaches only the sub-configuration's channels
    conv_grad, out_grad = torch.autograd.grad(aux, [model.encoder.convs[0].weight, model.decoders[1].out.weight])
    assert conv_grad[:2].abs().sum() > 0 and not conv_grad[2:].any()
    assert out_grad[:, :2].abs().sum() > 0 and not out_grad[:, 2:].any()
    # the encoder-feature term (CI-KD) adds to the output term
    outputs_only = _build(feature_weight=0.0).train()
    outputs_only.set_training_pool([narrow])
    outputs_only(x)
    assert 0 < float(outputs_only.auxiliary_loss().detach()) < float(aux.detach())  # type: ignore[union-attr]
    no_sampling = _build(n_sampled=0).train()
    no_sampling(x)
    assert no_sampling.auxiliary_loss() is None


def test_training_samples_sub_configurations() -> None:
    model = _build(n_sampled=3, sandwich=True).train()
    seen = []
    for seed in range(5):
        torch.manual_seed(seed)
        model(_inputs("image"))
        assert len(model.last_sampled) == 3 and model.last_sampled[0] == model.smallest_config
        assert all(c != model.full_config for c in model.last_sampled)
        seen += model.last_sampled[1:]
    assert len({tuple(c.values()) for c in seen}) > 1
    torch.manual_seed(7)
    model(_inputs("image"))
    first = model.last_sampled
    torch.manual_seed(7)
    model(_inputs("image"))
    assert model.last_sampled == first  # drawn from torch's RNG, which checkpoints save


def test_calibrate_batch_norm_recomputes_every_width() -> None:
    model = _build().eval()
    x = _inputs("image", n=9)
    data = TaskTensors(
        x, {t: torch.zeros(9) for t in model.task_names}, {t: torch.ones(9, dtype=torch.bool) for t in model.task_names}
    )
    calibrate_batch_norm(model, data, batch_size=8)  # the single-row last batch is skipped
    assert model.training is False
    for i, r in enumerate(model.widths):
        conv, bn = model.encoder.convs[0], model.encoder.conv_norms[0].bns[i]
        n_out = conv.active(1.0, r)[1]
        y = torch.nn.functional.conv2d(x["image"][:8], conv.weight[:n_out], conv.bias[:n_out])
        torch.testing.assert_close(bn.running_mean, y.mean(dim=(0, 2, 3)).detach())
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 1


# ----------------------------------------------------------------------------- search and errors
def test_search_picks_the_best_feasible_row() -> None:
    model = _build()
    full, small = model.full_config, model.smallest_config
    mid_b = {"encoder": 1.0, "b": 1.0, "m": 0.5, "r": 0.5}
    mid_m = {"encoder": 1.0, "b": 0.5, "m": 1.0, "r": 0.5}
    table = [
        {"config": small, "scores": {"b": 0.5, "m": 0.5, "r": 0.1}},
        {"config": mid_b, "scores": {"b": 0.9, "m": 0.6, "r": 0.2}},
        {"config": mid_m, "scores": {"b": 0.6, "m": 0.9, "r": 0.2}},
        {"config": full, "scores": {"b": 0.95, "m": 0.95, "r": 0.9}},
    ]
    fl = {k: model.count(c)["flops"] for k, c in [("small", small), ("b", mid_b), ("m", mid_m), ("full", full)]}
    assert fl["small"] < min(fl["b"], fl["m"]) and max(fl["b"], fl["m"]) < fl["full"]
    assert model.search(fl["full"], table=table) == full
    assert model.search(fl["full"] - 1, {"b": 1.0, "m": 0.2}, table) == mid_b
    assert model.search(fl["full"] - 1, {"b": 0.2, "m": 1.0}, table) == mid_m
    assert model.search(min(fl["b"], fl["m"]) - 1, {"b": 1.0}, table) == small
    # equal weighted scores: the cheaper configuration wins
    tie = [{"config": full, "scores": {"b": 0.5, "m": 0.5, "r": 0.5}}, *table[:1]]
    assert model.search(fl["full"], {"b": 1.0, "m": 1.0}, tie) == small
    # without a table: decoders ordered like the preferences, the widest encoder that fits
    cfg = model.search(fl["b"], {"b": 3.0, "m": 1.0, "r": 0.0})
    assert cfg["b"] >= cfg["m"] >= cfg["r"] and model.count(cfg)["flops"] <= fl["b"]
    assert model.search(fl["full"]) == full


def test_errors_name_the_value_and_the_valid_range() -> None:
    model = _build()
    cheapest = model.count(model.smallest_config)["flops"]
    with pytest.raises(ValueError, match=rf"budget_flops 100 is below .*valid: >= {cheapest}"):
        model.search(100)
    with pytest.raises(ValueError, match=r"unknown task 'x' in preferences; valid: b, m, r"):
        model.search(10**9, {"x": 1.0})
    with pytest.raises(ValueError, match=r"preference of 'b' must be finite and >= 0"):
        model.search(10**9, {"b": -1.0})
    with pytest.raises(ValueError, match=r"unknown task 'x' in configuration; valid keys: encoder, b, m, r"):
        model.set_config({"x": 0.5})
    with pytest.raises(ValueError, match=r"width 0.3 for 'm' is not allowed; valid: 0.5, 1"):
        model.count({"m": 0.3})
    with pytest.raises(ValueError, match=r"width 0.25 for 'encoder' is not allowed"):
        model.search(10**9, table=[{"config": {"encoder": 0.25}, "scores": {"b": 1, "m": 1, "r": 1}}])
    with pytest.raises(ValueError, match=r"needs 'scores' for tasks"):
        model.search(10**9, table=[{"config": {}}])
    with pytest.raises(ValueError, match=r"widths must be ratios in \(0, 1\] including 1.0"):
        _build(widths=(0.5, 0.75))
    with pytest.raises(ValueError, match="decoder_hidden needs at least one hidden layer"):
        _build(decoder_hidden=())
    with pytest.raises(ValueError, match="may not be named 'encoder'"):
        ControllableMTL([Task("encoder", "binary")], SPECS["image"])


# ----------------------------------------------------------------------------- training
def test_trains_on_multi_mnist_and_every_configuration_evaluates() -> None:
    data = load_dataset("multi-mnist", n_train=512, n_val=256, n_test=256)
    torch.manual_seed(0)
    model = build_model("controllable", data.tasks, data.input_spec, n_sampled=1, sandwich=True)
    config = TrainConfig(epochs=4, batch_size=64, lr=3e-3, patience=None)
    res = Trainer(model, data, "equal", config, None, progress=False).fit()
    losses = [sum(h["train_loss"].values()) for h in res.history]
    assert losses[-1] < losses[0]
    assert all(h["aux_loss"] > 0 for h in res.history)
    assert res.history[-1]["diagnostics"] == {"config": model.full_config}
    assert isinstance(model, ControllableMTL)
    was_training = model.training
    calibrate_batch_norm(model, data.train)
    table = profile_configurations(model, data.val)
    assert len(table) == 4**3
    for row in table:
        for metrics in row["metrics"].values():
            assert all(math.isfinite(v) for v in metrics.values()), row
    full = next(r for r in table if r["config"] == model.full_config)
    assert full["scores"]["left"] > 0.3 and full["scores"]["right"] > 0.2  # well above chance (0.1)
    assert model.config == model.full_config and model.training is was_training  # both restored
    budget = table[len(table) // 2]["flops"]
    chosen = model.search(budget, {"left": 1.0, "right": 0.0}, table)
    feasible = [r for r in table if r["flops"] <= budget]
    assert model.count(chosen)["flops"] <= budget
    assert next(r for r in table if r["config"] == chosen)["scores"]["left"] == max(
        r["scores"]["left"] for r in feasible
    )
