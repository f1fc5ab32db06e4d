"""MultiTab-Net: the multi-task attention mask, task-token isolation, and training with balancers."""

from __future__ import annotations

import torch

from polytask.data import InputSpec, TaskTensors
from polytask.data._bundle import DataBundle
from polytask.nn import MODELS, build_model
from polytask.nn.architectures.multitab import multitask_attention_mask
from polytask.tasks import Task, TaskKind
from polytask.train import TrainConfig, Trainer

SPEC = InputSpec("tabular", n_numeric=3, cardinalities=(4, 3))
TASKS = [
    Task("a", TaskKind.REGRESSION),
    Task("b", TaskKind.BINARY, n_classes=2, classes=("0", "1")),
    Task("c", TaskKind.MULTICLASS, n_classes=3, classes=("x", "y", "z")),
]


def _x(n: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "num": torch.randn(n, 3, generator=g),
        "cat": torch.stack([torch.randint(0, 4, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)], 1),
    }


def test_mask_by_hand() -> None:
    # 2 features (f0, f1) then 2 tasks (t0, t1); True = may not attend.
    expected = torch.tensor(
        [
            [False, False, True, True],  # f0 sees features only
            [False, False, True, True],
            [False, False, False, True],  # t0 sees features and itself, not t1
            [False, False, True, False],
        ]
    )
    assert torch.equal(multitask_attention_mask(2, 2), expected)
    with_tasks = multitask_attention_mask(2, 2, features_see_tasks=True)
    assert not with_tasks[:2].any()  # features may read every token
    assert torch.equal(with_tasks[2:], expected[2:])  # task rows are the same


def test_perturbing_one_task_token_leaves_other_tasks_unchanged() -> None:
    torch.manual_seed(0)
    model = build_model("multitab", TASKS, SPEC, n_blocks=3, dropout=0.0).eval()
    x = _x()
    d = model.n_features
    tokens = model.tokens(x)
    bumped = tokens.clone()
    bumped[:, d + 1] += 5.0 * torch.randn_like(bumped[:, d + 1])  # task "b"'s token
    for masked in (False, True):  # the fast split attention and nn.MultiheadAttention with the mask
        model.use_masked_attention = masked
        h, h2 = model.encode(tokens), model.encode(bumped)
        for k in (0, 2):
            torch.testing.assert_close(h2[:, d + k], h[:, d + k], rtol=0, atol=1e-6)
        torch.testing.assert_close(h2[:, :d], h[:, :d], rtol=0, atol=1e-6)  # the shared feature stream too
        assert (h2[:, d + 1] - h[:, d + 1]).abs().max() > 1e-2
    # The property comes from the mask: letting features read task tokens couples the tasks (depth >= 2).
    torch.manual_seed(0)
    leaky = build_model("multitab", TASKS, SPEC, n_blocks=3, dropout=0.0, features_see_tasks=True).eval()
    t = leaky.tokens(x)
    b = t.clone()
    b[:, d + 1] += 5.0 * torch.randn_like(b[:, d + 1])  # a constant shift would vanish in LayerNorm
    assert (leaky.encode(b)[:, d] - leaky.encode(t)[:, d]).abs().max() > 1e-4


def test_outputs_parameters_and_registry() -> None:
    model = build_model("multitab", TASKS, SPEC)
    preds, reps = model.forward_with_representation(_x(5))
    assert preds["a"].shape == (5,) and preds["b"].shape == (5,) and preds["c"].shape == (5, 3)
    assert reps[0].shape == (5, 5, 32)  # 3 numeric + 2 categorical feature tokens
    own = model.task_parameter_names("b")
    assert "task_tokens.1" in own and all(n.startswith(("task_tokens.1", "heads.1.")) for n in own)
    shared = set(model.shared_parameter_names())
    assert not shared & set(own) and any(n.startswith("blocks.0.attn") for n in shared)
    assert "MultiTab" in MODELS["multitab"].paper


def _bundle(n: int = 96) -> DataBundle:
    x = _x(n, seed=1)
    y = {"a": x["num"][:, 0] * 2, "b": (x["num"][:, 1] > 0).float(), "c": x["cat"][:, 1].clone()}
    # task-column style: each row has only one task's label
    owner = torch.arange(n) % 3
    mask = {t: owner == k for k, t in enumerate("abc")}
    data = TaskTensors(x, y, mask)
    return DataBundle("toy", TASKS, SPEC, data, data, data)


def test_trains_with_a_gradient_balancer_on_task_column_data() -> None:
    torch.manual_seed(0)
    bundle = _bundle()
    model = build_model("multitab", TASKS, SPEC, dim=16, n_heads=2, ffn_dim=32)
    cfg = TrainConfig(epochs=3, batch_size=32, lr=3e-3, patience=None)
    res = Trainer(model, bundle, "pcgrad", cfg, progress=False).fit()
    losses = [sum(h["train_loss"].values()) for h in res.history]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_split_attention_equals_masked_attention() -> None:
    torch.manual_seed(0)
    model = build_model("multitab", TASKS, SPEC, n_blocks=2, dropout=0.0).eval()
    x = _x()
    fast = model(x)
    model.use_masked_attention = True  # nn.MultiheadAttention with the (d + t)^2 boolean mask
    ref = model(x)
    for t in fast:
        torch.testing.assert_close(fast[t], ref[t], rtol=1e-5, atol=1e-5)


def test_cli_fit_model_multitab_and_evaluate(tmp_path) -> None:
    """`polytask fit --model multitab` on a task-column data set, with a gradient balancer; the run reloads."""
    import json

    from click.testing import CliRunner

    from polytask.cli import cli

    out = tmp_path / "run"
    args = ["fit", "synthetic-outliers", "--data-param", "n_samples=40", "--data-param", "n_tasks=3", "--model",
            "multitab", "--model-param", "dim=8", "--model-param", "ffn_dim=8", "--balancer", "mgda", "--epochs", "2",
            "--batch-size", "32", "--output", str(out), "--quiet"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["name"] == "multitab" and set(results["test"]) == {"y@0", "y@1", "y@2"}
    again = CliRunner().invoke(cli, ["evaluate", str(out)])
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(cli, [*args[:8], "--model-param", "heads=3", "--output", str(tmp_path / "b"), "--quiet"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines()[-1].startswith("error: model 'multitab' has no parameter ['heads']; valid: ")
