"""Task-gradient statistics for the report: cosine similarities and norms from the engine's Gramian,
logged per epoch only when the balancer formed the Gramian or Jacobian anyway."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from polytask.balance import GradientEngine
from polytask.balance._capture import capture_linear
from polytask.balance._engine import gradient_cosine
from polytask.data import DataBundle, InputSpec, TaskTensors
from polytask.nn import build_model
from polytask.tasks import Task
from polytask.train import TrainConfig, Trainer


def test_cosine_from_gramian_reference_values_and_zero_rows() -> None:
    cos, norms = gradient_cosine(torch.tensor([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(norms, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    # Tasks 0 and 1 are parallel; task 2 has no gradient: cosine 0, not NaN.
    torch.testing.assert_close(
        cos, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    )
    cos, norms = gradient_cosine(torch.tensor([[1.0, -1.0], [-1.0, 4.0]]))
    assert cos[0, 1].item() == pytest.approx(-0.5) and norms.tolist() == [1.0, 2.0]


def _bundle(n: int = 48) -> DataBundle:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 5, generator=g)
    tasks = [Task("a", "regression"), Task("b", "regression"), Task("c", "binary")]
    y = {"a": x[:, 0] + 0.1 * torch.randn(n, generator=g), "b": -x[:, 0] + x[:, 1], "c": (x[:, 2] > 0).float()}
    split = TaskTensors({"num": x, "cat": torch.zeros(n, 0, dtype=torch.long)}, y,
                        {k: torch.ones(n, dtype=torch.bool) for k in y})  # fmt: skip
    return DataBundle("toy3", tasks, InputSpec("tabular", n_numeric=5), split, split)


def _reference_cosine(model: torch.nn.Module, bundle: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and norms of the explicit per-task gradients of the shared parameters (K autograd calls)."""
    shared = list(model.shared_parameters())
    preds = model(bundle.train.x)
    rows = []
    for t in bundle.tasks:
        loss = t.loss(preds[t.name], bundle.train.y[t.name], bundle.train.mask[t.name])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)]))
    j = torch.stack(rows).double()
    n = j.norm(dim=1)
    return (j @ j.T) / (n[:, None] * n[None, :]), n


def test_engine_statistics_match_explicit_gradients_and_cost_nothing_for_loss_level() -> None:
    bundle = _bundle()
    torch.manual_seed(0)
    model = build_model("shared-bottom", bundle.tasks, bundle.input_spec, hidden=(16, 8))
    ref_cos, ref_norm = _reference_cosine(model, bundle)
    shared = list(model.shared_parameters())
    specific = [p for n, p in model.named_parameters() if n not in set(model.shared_parameter_names())]
    batch = bundle.train
    with capture_linear(model, shared) as caps:
        preds = model(batch.x)
    losses = {t.name: t.loss(preds[t.name], batch.y[t.name], batch.mask[t.name]) for t in bundle.tasks}
    engine = GradientEngine(losses, shared, specific, captures=caps)
    assert engine.gradient_statistics() is None  # nothing formed yet
    engine.gramian()  # the fast (layer-kernel) path
    cos, norms = engine.gradient_statistics()
    torch.testing.assert_close(cos, ref_cos, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(norms, ref_norm, rtol=1e-4, atol=1e-6)
    assert 0.05 < cos[0, 1].abs() < 0.99  # a non-trivial value: neither orthogonal nor parallel
    # A loss-level step never computes per-task gradients, so there is nothing to log.
    preds = model(batch.x)
    losses = {t.name: t.loss(preds[t.name], batch.y[t.name], batch.mask[t.name]) for t in bundle.tasks}
    engine = GradientEngine(losses, shared, specific)
    engine.backward_weighted({"a": 1.0, "b": 1.0, "c": 1.0})
    assert engine.gradient_statistics() is None and engine._per_task is None


def test_trainer_logs_the_epoch_mean_cosine_of_its_steps(tmp_path: Path) -> None:
    bundle = _bundle()
    torch.manual_seed(0)
    model = build_model("shared-bottom", bundle.tasks, bundle.input_spec, hidden=(16, 8))
    ref_cos, ref_norm = _reference_cosine(copy.deepcopy(model), bundle)
    # One full-batch step per epoch: epoch 1's statistics are those of the initial weights.
    cfg = TrainConfig(epochs=2, batch_size=len(bundle.train), patience=None)
    Trainer(model, bundle, "upgrad", cfg, tmp_path / "run", progress=False).fit()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    names = ["a", "b", "c"]
    logged = torch.tensor([[first["grad_cosine"][r][c] for c in names] for r in names], dtype=torch.float64)
    torch.testing.assert_close(logged, ref_cos, rtol=0, atol=2e-5)
    assert [first["grad_norm"][t] for t in names] == pytest.approx(ref_norm.tolist(), rel=1e-4)
    assert set(first["weights"]) == set(names)
