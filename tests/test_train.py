from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from polytask.data import DataBundle, InputSpec, TaskTensors
from polytask.nn import MultiTaskModel, build_model
from polytask.tasks import Task
from polytask.train import (
    CheckpointError,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    load_run,
)

TASKS = [Task("click", "binary", classes=("0", "1")), Task("spend", "regression", y_mean=1.0, y_std=2.0)]
SPEC = InputSpec("tabular", n_numeric=4, cardinalities=(5,))


def _split(n: int, seed: int) -> TaskTensors:
    g = torch.Generator().manual_seed(seed)
    num = torch.randn(n, 4, generator=g)
    cat = torch.randint(0, 5, (n, 1), generator=g)
    logit = 2 * num[:, 0] - num[:, 1] + (cat[:, 0] == 3).float() * 1.5
    click = (torch.rand(n, generator=g) < torch.sigmoid(logit)).float()
    spend = 1.0 + 2.0 * (num[:, 0] + 0.5 * num[:, 2]) + 0.1 * torch.randn(n, generator=g)
    mask_spend = torch.rand(n, generator=g) < 0.7  # 30% missing labels
    return TaskTensors(
        {"num": num, "cat": cat},
        {"click": click, "spend": torch.where(mask_spend, spend, torch.nan)},
        {"click": torch.ones(n, dtype=torch.bool), "spend": mask_spend},
    )


def bundle(n: int = 600) -> DataBundle:
    return DataBundle("synthetic", list(TASKS), SPEC, _split(n, 1), _split(200, 2), _split(200, 3))


def _trainer(run_dir: Path | None, model: str = "shared-bottom", **cfg: object) -> Trainer:
    torch.manual_seed(123)
    net = build_model(model, TASKS, SPEC)
    config = TrainConfig(**{"epochs": 4, "batch_size": 64, "lr": 3e-3, "patience": None, **cfg})  # type: ignore[arg-type]
    return Trainer(
        net, bundle(), "equal", config, run_dir, progress=False, run_meta={"model": {"name": model, "params": {}}}
    )


def test_fit_learns_and_selects_on_validation(tmp_path: Path) -> None:
    res = _trainer(tmp_path / "run", epochs=6).fit()
    assert res.test is not None
    assert res.test["click"]["auc"] > 0.8
    assert res.test["spend"]["r2"] > 0.7
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    rec = json.loads(lines[0])
    assert set(rec) >= {"epoch", "seconds", "lr", "train_loss", "weights", "val", "best_epoch"}
    # The chosen epoch is the best on validation, whatever the test split says.
    scores = [(json.loads(line)["val"]["click"]["auc"] + json.loads(line)["val"]["spend"]["r2"]) / 2 for line in lines]
    assert res.best_epoch == 1 + max(range(len(scores)), key=lambda i: (scores[i], -i))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test"]["click"]["auc"] == pytest.approx(res.test["click"]["auc"])


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    full = _trainer(tmp_path / "full").fit()

    class Killed(Exception):
        pass

    t = _trainer(tmp_path / "cut")
    original = t._save_last
    calls = {"n": 0}

    def save_then_die() -> None:
        original()
        calls["n"] += 1
        if calls["n"] == 2:
            raise Killed

    t._save_last = save_then_die  # type: ignore[method-assign]
    with pytest.raises(Killed):
        t.fit()
    # A fresh process would rebuild the model with another initialisation: resume must not care.
    torch.manual_seed(999)
    resumed = Trainer(
        build_model("shared-bottom", TASKS, SPEC),
        bundle(),
        "equal",
        t.config,
        tmp_path / "cut",
        progress=False,
        run_meta={"model": {"name": "shared-bottom", "params": {}}},
    ).fit(resume=True)
    assert resumed.test == full.test
    assert resumed.best_epoch == full.best_epoch
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 4


def test_refuses_to_overwrite_and_resume_needs_same_settings(tmp_path: Path) -> None:
    _trainer(tmp_path / "run", epochs=1).fit()
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        _trainer(tmp_path / "run", epochs=1).fit()
    with pytest.raises(ValueError, match=r"training settings differ from the saved run in \['lr'\]"):
        _trainer(tmp_path / "run", epochs=1, lr=0.5).fit(resume=True)


class _Exploding(MultiTaskModel):
    """Finite for ``good_steps`` training steps, then NaN for task 'spend'."""

    def __init__(self, good_steps: int) -> None:
        super().__init__(TASKS, SPEC)
        self.body = torch.nn.Linear(4, 8)
        self.heads = torch.nn.ModuleDict({t.name: torch.nn.Linear(8, 1) for t in TASKS})
        self.good_steps = good_steps
        self.calls = 0

    def forward_with_representation(self, x):  # type: ignore[no-untyped-def]
        if self.training:
            self.calls += 1
        h = torch.relu(self.body(x["num"]))
        out = {t: head(h)[:, 0] for t, head in self.heads.items()}
        if self.training and self.calls > self.good_steps:
            out["spend"] = out["spend"] * torch.nan
        return out, [h]

    def task_parameter_names(self, task: str) -> list[str]:
        return [f"heads.{task}.weight", f"heads.{task}.bias"]


def test_nan_loss_stops_names_task_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    net = _Exploding(good_steps=12)  # 600 rows / 64 = 10 steps per epoch: NaN in epoch 2
    t = Trainer(net, bundle(), "equal", TrainConfig(epochs=4, batch_size=64, patience=None), tmp_path, progress=False)
    with pytest.raises(
        NonFiniteLossError, match=r"loss of task\(s\) 'spend' became .* at epoch 2, step 3; .*last good"
    ):
        t.fit()
    tensors, meta = load_checkpoint(tmp_path / "checkpoints" / "last.json")
    assert meta["trainer_state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("model."))
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_tampered_and_truncated_checkpoints_are_refused(tmp_path: Path) -> None:
    _trainer(tmp_path / "run", epochs=1).fit()
    ck = tmp_path / "run" / "checkpoints"
    meta = json.loads((ck / "best.json").read_text())
    tensor_file = ck / meta["tensors"]
    blob = bytearray(tensor_file.read_bytes())
    blob[-5] ^= 0xFF
    tensor_file.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"fails its sha256 check .* truncated or modified"):
        load_checkpoint(ck / "best.json")
    (ck / "last.json").write_text((ck / "last.json").read_text()[:50])
    with pytest.raises(CheckpointError, match=r"is not valid JSON .* truncated or corrupted"):
        load_checkpoint(ck / "last.json")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(ck / "nope.json")


def test_checkpoint_round_trip_rebuilds_identical_model(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", epochs=2)
    t.fit()
    run = load_run(tmp_path / "run")
    x = bundle().test.x
    t.model.eval()
    with torch.no_grad():
        expected = t.model(x)
        got = run.model(x)
    for k in expected:
        assert torch.equal(expected[k], got[k])
    assert run.tasks == TASKS


def test_single_task_baseline_selects_best_epoch_per_task(tmp_path: Path) -> None:
    t = _trainer(tmp_path / "run", model="single", epochs=5)
    res = t.fit()
    assert isinstance(res.best_epoch, dict) and set(res.best_epoch) == {"click", "spend"}
    hist = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for task, metric in (("click", "auc"), ("spend", "r2")):
        vals = [h["val"][task][metric] for h in hist]
        assert res.best_epoch[task] == 1 + vals.index(max(vals))
        # The final model's validation score for each task is that task's best epoch's score.
        assert res.val[task][metric] == pytest.approx(max(vals), abs=1e-6)


def test_uncertainty_weighting_learns_its_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = build_model("shared-bottom", TASKS, SPEC)
    t = Trainer(
        net,
        bundle(),
        "uncertainty",
        TrainConfig(epochs=3, batch_size=64, lr=1e-2, patience=None),
        tmp_path,
        progress=False,
    )
    t.fit()
    log_var = t.balancer.log_var.detach()
    assert not torch.equal(log_var, torch.zeros(2))
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert not math.isclose(rec["weights"]["click"], 1.0)
    # The balancer's parameters are part of the checkpoint.
    tensors, _ = load_checkpoint(tmp_path / "checkpoints" / "last.json")
    assert torch.equal(tensors["balancer.log_var"], log_var)


class _PenalisedBottom(MultiTaskModel):
    """Shared-bottom with an auxiliary loss ``c * ||trunk output||^2`` from the last training forward."""

    def __init__(self, c: float) -> None:
        super().__init__(list(TASKS), SPEC)
        torch.manual_seed(7)
        self.inner = build_model("shared-bottom", TASKS, SPEC)
        self.c = c
        self._aux: torch.Tensor | None = None

    def forward_with_representation(self, x: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list]:
        preds, reps = self.inner.forward_with_representation(x)
        self._aux = self.c * reps[0].pow(2).mean() if self.training else None
        return preds, reps

    def task_parameter_names(self, task: str) -> list[str]:
        return ["inner." + n for n in self.inner.task_parameter_names(task)]

    def auxiliary_loss(self) -> torch.Tensor | None:
        return self._aux


@pytest.mark.parametrize("balancer", ["equal", "upgrad"])
def test_auxiliary_loss_gradient_is_added_under_any_balancer(balancer: str) -> None:
    """The step's gradient is the balancer's plus the auxiliary loss's, and the epoch log has it."""
    data = bundle(128)
    batch = data.train.take(torch.arange(64))
    grads = {}
    for c in (0.0, 2.0):
        net = _PenalisedBottom(c)
        t = Trainer(net, data, balancer, TrainConfig(epochs=1, batch_size=64, lr=1e-3, grad_clip=None), progress=False)
        t.step(batch)
        grads[c] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net = _PenalisedBottom(2.0)
    _, reps = net.forward_with_representation(batch.x)
    aux = 2.0 * reps[0].pow(2).mean()
    names = [n for n, _ in net.named_parameters()]
    want = dict(zip(names, torch.autograd.grad(aux, list(net.parameters()), allow_unused=True), strict=True))
    for n, g in grads[2.0].items():
        extra = want[n] if want[n] is not None else torch.zeros_like(g)
        torch.testing.assert_close(g, grads[0.0].get(n, torch.zeros_like(g)) + extra, rtol=1e-4, atol=1e-6)
    t = Trainer(_PenalisedBottom(2.0), data, balancer, TrainConfig(epochs=1, batch_size=64), progress=False)
    t.fit()
    assert t.history[-1]["aux_loss"] > 0
