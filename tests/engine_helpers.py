"""A tiny model's task losses and gradient engine, built as the trainer builds them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from polytask.balance import GradientEngine
from polytask.balance._capture import capture_linear
from polytask.data import InputSpec
from polytask.nn import MultiTaskModel, build_model
from polytask.tasks import Task

TASKS = [Task("a", "binary"), Task("b", "multiclass", n_classes=3), Task("c", "regression")]
TABULAR = InputSpec("tabular", n_numeric=3, cardinalities=(4,))
IMAGE = InputSpec("image", channels=1, height=28, width=28)


@dataclass
class Step:
    net: MultiTaskModel
    losses: dict[str, torch.Tensor]
    engine: GradientEngine
    shared: list[torch.nn.Parameter]
    specific: list[torch.nn.Parameter]


def tiny_step(
    model: str = "shared-bottom",
    spec: InputSpec = TABULAR,
    no_labels_for: str | None = None,
    seed: int = 0,
    n: int = 16,
    capture: bool = True,
    reforward: bool = False,
) -> Step:
    """Forward a random batch; ``capture`` records shared linear layers (the engine's fast path);
    ``reforward`` gives the engine a re-run of the forward pass on the same batch, as the trainer does."""
    torch.manual_seed(seed)
    net = build_model(model, TASKS, spec)
    if spec.kind == "image":
        x = {"image": torch.rand(n, 1, 28, 28)}
    else:
        x = {"num": torch.randn(n, 3), "cat": torch.randint(0, 4, (n, 1))}
    y = {"a": torch.randint(0, 2, (n,)).float(), "b": torch.randint(0, 3, (n,)), "c": torch.randn(n)}
    mask = {t: torch.ones(n, dtype=torch.bool) for t in y}
    if no_labels_for:
        mask[no_labels_for][:] = False
    shared_names = set(net.shared_parameter_names())
    shared = [p for name, p in net.named_parameters() if name in shared_names]
    specific = [p for name, p in net.named_parameters() if name not in shared_names]
    with capture_linear(net, shared) as caps:
        preds, reps = net.forward_with_representation(x)
    losses = {t.name: t.loss(preds[t.name], y[t.name], mask[t.name]) for t in TASKS}

    def rerun() -> dict[str, torch.Tensor]:
        out = net(x)
        return {t.name: t.loss(out[t.name], y[t.name], mask[t.name]) for t in TASKS}

    engine = GradientEngine(losses, shared, specific, reps, caps if capture else None, rerun if reforward else None)
    return Step(net, losses, engine, shared, specific)
