"""Training on an accelerator: the same run on the GPU as on the CPU, and GPU runs that resume and
evaluate on a CPU.

Each test runs on every device this machine has: the CPU always, CUDA where torch sees a GPU
(``scripts/gpu_check.sh`` runs this file on a lent GPU machine). On a CPU-only machine the CPU cases
still check what the GPU cases compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from polytask.balance import BALANCERS
from polytask.nn import build_model
from polytask.train import TrainConfig, Trainer, evaluate_model, fit, load_checkpoint, load_run
from test_device import FUNNEL, FUNNEL_MODELS, SMALL, TABULAR, _bundle

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ACCELERATORS = [d for d in DEVICES if d != "cpu"]
needs_accelerator = pytest.mark.skipif(not ACCELERATORS, reason="no GPU on this machine")


def _fit(device: str, balancer: str = "upgrad", run_dir: Path | None = None, epochs: int = 3) -> Trainer:
    torch.manual_seed(0)
    data = _bundle(TABULAR)
    net = build_model("mmoe", data.tasks, TABULAR, n_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    cfg = TrainConfig(epochs=epochs, batch_size=8, patience=None, lr=1e-2)
    trainer = Trainer(net, data, balancer, cfg, run_dir=run_dir, progress=False, device=device)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("balancer", ["equal", "upgrad", "famo"])
def test_training_on_a_device_matches_the_cpu(device: str, balancer: str) -> None:
    on_device, on_cpu = _fit(device, balancer), _fit("cpu", balancer)
    assert next(on_device.model.parameters()).device.type == device
    got = {k: v.cpu() for k, v in on_device.model.state_dict().items()}
    for k, v in on_cpu.model.state_dict().items():
        # float32 kernels differ between devices; 3 epochs of 3 steps stay within this
        torch.testing.assert_close(got[k], v, rtol=1e-3, atol=1e-4, msg=f"parameter {k}")
    for a, b in zip(on_device.history, on_cpu.history, strict=True):
        for task, metrics in b["val"].items():
            for m, v in metrics.items():
                assert a["val"][task][m] == pytest.approx(v, rel=1e-3, abs=1e-4), (task, m)


@pytest.mark.parametrize("device", DEVICES)
def test_a_device_run_resumes_and_evaluates_on_the_cpu(device: str, tmp_path: Path) -> None:
    data = _bundle(TABULAR)
    kw = {
        "model": "mmoe",
        "model_params": {"n_experts": 2, "expert_hidden": (8,), "tower_hidden": (4,)},
        "config": TrainConfig(epochs=2, batch_size=8, patience=None, lr=1e-2),
        "output": tmp_path,
        "progress": False,
    }
    fit(data, device=device, **kw)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"].split(":")[0] == device
    tensors, _ = load_checkpoint(tmp_path / "checkpoints" / "last.json")
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert ("rng.cuda" in tensors) == (device == "cuda")
    # the CPU takes over the same run: nothing is left to train, and the same best model is evaluated
    res = fit(data, device="cpu", resume=True, **kw)
    assert len(res.history) == 2  # the saved history; no epoch was trained again
    for task, metrics in results["val"].items():
        for m, v in metrics.items():
            assert res.val[task][m] == pytest.approx(v, rel=1e-4, abs=1e-5), (task, m)
    run = load_run(tmp_path, device="cpu")  # the best checkpoint, rebuilt on the CPU
    assert next(run.model.parameters()).device.type == "cpu"
    again = evaluate_model(run.model, data.val, run.tasks)
    for task, metrics in results["val"].items():
        for m, v in metrics.items():
            assert again[task][m] == pytest.approx(v, rel=1e-4, abs=1e-5), (task, m)


@needs_accelerator
@pytest.mark.parametrize("balancer", sorted(BALANCERS))
def test_every_balancer_trains_on_the_accelerator(balancer: str) -> None:
    torch.manual_seed(0)
    data = _bundle(TABULAR)
    net = build_model("shared-bottom", data.tasks, TABULAR, hidden=(8,), tower_hidden=(4,))
    cfg = TrainConfig(epochs=2, batch_size=8, patience=None, max_steps_per_epoch=2)
    res = Trainer(net, data, balancer, cfg, progress=False, device=ACCELERATORS[0]).fit()
    assert all(v == v for m in res.val.values() for v in m.values())  # no NaN


@needs_accelerator
@pytest.mark.parametrize("name", sorted([*SMALL, *FUNNEL_MODELS]))
def test_every_architecture_trains_on_the_accelerator(name: str) -> None:
    spec, params = SMALL[name] if name in SMALL else (TABULAR, FUNNEL_MODELS[name])
    torch.manual_seed(0)
    data = _bundle(spec, FUNNEL) if name in FUNNEL_MODELS else _bundle(spec)
    net = build_model(name, data.tasks, spec, **params)
    cfg = TrainConfig(epochs=2, batch_size=8, patience=None, max_steps_per_epoch=2)
    balancer = "upgrad" if name not in ("single", *FUNNEL_MODELS) else "equal"
    res = Trainer(net, data, balancer, cfg, progress=False, device=ACCELERATORS[0]).fit()
    assert next(net.parameters()).device.type == ACCELERATORS[0]
    assert all(v == v for m in res.val.values() for v in m.values())
