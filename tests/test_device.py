"""The training device: resolution and its errors, the CLI, and an audit of tensor placement.

No GPU is attached to this project's machines, so the placement audit stands in for a CUDA run: it
trains every balancer and every architecture with a torch-function mode that records each tensor
factory call (``torch.zeros``, ``torch.tensor``, ...) made from polytask's training code without a
``device=``. On a GPU such a tensor lands on the CPU and the first operation that mixes it with the
model's tensors fails ("expected all tensors to be on the same device"); here it would pass silently.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from torch.overrides import TorchFunctionMode

import polytask
from polytask.balance import BALANCERS
from polytask.cli import cli
from polytask.data import DataBundle, InputSpec, TaskTensors
from polytask.nn import MODELS, build_model
from polytask.tasks import Task
from polytask.train import TrainConfig, Trainer, resolve_device

SRC = Path(polytask.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
#: Code whose tensors may live on the training device (metrics run on CPU copies by design).
AUDITED = [SRC / "nn", SRC / "balance", SRC / "train", SRC / "tasks.py"]
FACTORIES = {
    "zeros", "ones", "full", "empty", "tensor", "as_tensor", "arange", "eye", "rand", "randn",
    "randint", "randperm", "linspace", "logspace", "scalar_tensor",
}  # fmt: skip


class PlacementAudit(TorchFunctionMode):
    """Records ``file:line`` of factory calls from audited polytask code that name no device."""

    def __init__(self) -> None:
        super().__init__()
        self.unplaced: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in FACTORIES and "device" not in kwargs:
            # as_tensor of a tensor keeps that tensor's device: not a placement decision.
            if not (name == "as_tensor" and args and torch.is_tensor(args[0])):
                where = self._caller()
                if where is not None:
                    self.unplaced.add(f"{where} torch.{name}")
        return func(*args, **kwargs)

    @staticmethod
    def _caller() -> str | None:
        frame = sys._getframe(2)
        while frame is not None:
            path = Path(frame.f_code.co_filename).resolve()
            if not (path.is_relative_to(TORCH) or path == Path(__file__).resolve()):
                if any(path == a or path.is_relative_to(a) for a in AUDITED):
                    return f"{path.relative_to(SRC)}:{frame.f_lineno}"
                return None
            frame = frame.f_back
        return None


TASKS = [Task("b", "binary"), Task("m", "multiclass", n_classes=3), Task("r", "regression")]
TABULAR = InputSpec("tabular", n_numeric=3, cardinalities=(4, 5))
IMAGE = InputSpec("image", channels=1, height=28, width=28)


def _bundle(spec: InputSpec, tasks: list[Task] = TASKS, n: int = 24) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    if spec.kind == "tabular":
        cats = torch.stack([torch.randint(0, c, (n,), generator=g) for c in spec.cardinalities], dim=1)
        x = {"num": torch.randn(n, spec.n_numeric, generator=g), "cat": cats}
    else:
        x = {"image": torch.rand(n, 1, 28, 28, generator=g)}
    y: dict[str, torch.Tensor] = {}
    for t in tasks:
        if t.kind.value == "multiclass":
            y[t.name] = torch.randint(0, t.n_classes, (n,), generator=g)
        elif t.kind.value == "regression":
            y[t.name] = torch.randn(n, generator=g)
        else:
            y[t.name] = torch.randint(0, 2, (n,), generator=g).float()
    mask = {t.name: torch.rand(n, generator=g) > 0.2 for t in tasks}  # some labels missing
    split = TaskTensors(x, y, mask)
    return DataBundle("toy", tasks, spec, split, split, split)


SMALL: dict[str, tuple[InputSpec, dict[str, Any]]] = {
    "single": (TABULAR, {"hidden": (8,), "tower_hidden": (4,)}),
    "shared-bottom": (TABULAR, {"hidden": (8,), "tower_hidden": (4,)}),
    "mmoe": (TABULAR, {"n_experts": 3, "expert_hidden": (8,), "tower_hidden": (4,)}),
    "cgc": (TABULAR, {"n_shared_experts": 2, "n_task_experts": 1, "expert_hidden": (8,), "tower_hidden": (4,)}),
    "ple": (TABULAR, {"n_shared_experts": 2, "n_task_experts": 1, "expert_hidden": (8,), "tower_hidden": (4,)}),
    "home": (TABULAR, {"n_shared_experts": 1, "n_group_experts": 1, "expert_hidden": (8,), "feature_gate_rank": 2}),
    "dselect-k": (TABULAR, {"n_experts": 3, "k": 2, "expert_hidden": (8,), "tower_hidden": (4,)}),
    "cross-stitch": (TABULAR, {"hidden": (8,), "tower_hidden": (4,)}),
    "apem": (TABULAR, {"emb_dim": 4, "n_groups": 2, "n_layers": 1, "n_heads": 1, "tower_hidden": (4,)}),
    "dtrn": (TABULAR, {"emb_dim": 4, "task_emb_dim": 4, "n_heads": 1, "tower_hidden": (4,)}),
    "multitab": (TABULAR, {"dim": 8, "n_blocks": 1, "n_heads": 2, "ffn_dim": 8}),
    "controllable": (IMAGE, {"widths": (0.5, 1.0), "conv_channels": (4, 8), "hidden": (8,), "decoder_hidden": (4,)}),
    "mtan": (IMAGE, {"widths": (4, 8), "blocks_per_stage": 1}),
    "resnet-shared-bottom": (IMAGE, {"widths": (4, 8), "blocks_per_stage": 1}),
    "task-expert": (IMAGE, {"widths": (4, 8), "blocks_per_stage": 1, "n_experts": 2, "expert_dim": 4}),
    "mod-squad": (IMAGE, {"dim": 8, "depth": 2, "heads": 2, "patch_size": 7, "n_experts": 3, "attn_experts": 3}),
    "m3vit": (IMAGE, {"dim": 8, "depth": 2, "heads": 2, "patch_size": 7, "n_experts": 3}),
}
FUNNEL = [Task("click", "binary"), Task("conversion", "binary")]
FUNNEL_MODELS = {"esmm": {"tower_hidden": (4,)}, "aitm": {"tower_hidden": (4,)}}


def _audited_fit(model: torch.nn.Module, data: DataBundle, balancer: str, tmp_path: Path | None = None) -> set[str]:
    cfg = TrainConfig(epochs=2, batch_size=8, patience=None, max_steps_per_epoch=2)
    trainer = Trainer(model, data, balancer, cfg, run_dir=tmp_path, progress=False, device="cpu")
    audit = PlacementAudit()
    with audit:
        trainer.fit()
    return audit.unplaced


def test_audit_catches_an_unplaced_tensor() -> None:
    audit = PlacementAudit()
    with audit:
        # Code compiled under an audited file name counts as that file's: one unplaced call, one placed.
        code = "import torch\ntorch.zeros(3)\ntorch.ones(2, device='cpu')\ntorch.as_tensor(t)\n"
        exec(compile(code, str(SRC / "tasks.py"), "exec"), {"t": torch.ones(1, device="cpu")})
        torch.zeros(3)  # from this test file: not audited
    assert audit.unplaced == {"tasks.py:2 torch.zeros"}


@pytest.mark.parametrize("name", sorted(BALANCERS))
def test_every_balancer_places_its_tensors_on_the_training_device(name: str) -> None:
    torch.manual_seed(0)
    data = _bundle(TABULAR)
    net = build_model("shared-bottom", data.tasks, TABULAR, hidden=(8,), tower_hidden=(4,))
    assert _audited_fit(net, data, name) == set()


def test_every_architecture_is_audited() -> None:
    # "text" (a Hugging Face encoder from a folder) is audited in test_text_cli.py
    assert sorted(MODELS) == sorted([*SMALL, *FUNNEL_MODELS, "text"])
    assert (
        "def test_text_model_places_its_tensors_on_the_training_device"
        in (Path(__file__).parent / "test_text_cli.py").read_text()
    )


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_architecture_places_its_tensors_on_the_training_device(name: str) -> None:
    spec, params = SMALL[name]
    torch.manual_seed(0)
    data = _bundle(spec)
    net = build_model(name, data.tasks, spec, **params)
    # a gradient-level balancer also runs the engine's layer capture on the architecture
    assert _audited_fit(net, data, "upgrad" if name != "single" else "equal") == set()


@pytest.mark.parametrize("name", sorted(FUNNEL_MODELS))
def test_funnel_architectures_place_their_tensors_on_the_training_device(name: str) -> None:
    torch.manual_seed(0)
    data = _bundle(TABULAR, FUNNEL)
    net = build_model(name, data.tasks, TABULAR, **FUNNEL_MODELS[name])
    assert _audited_fit(net, data, "equal") == set()


def test_checkpoint_resume_and_run_files_are_audited(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = _bundle(TABULAR)
    net = build_model("mmoe", data.tasks, TABULAR, n_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    assert _audited_fit(net, data, "famo", tmp_path) == set()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"] == "cpu" and results["world_size"] == 1
    more = TrainConfig(epochs=3, batch_size=8, patience=None, max_steps_per_epoch=2)
    net2 = build_model("mmoe", data.tasks, TABULAR, n_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    trainer = Trainer(net2, data, "famo", more, run_dir=tmp_path, progress=False, device="cpu")
    audit = PlacementAudit()
    with pytest.raises(ValueError, match="training settings differ"), audit:
        trainer.fit(resume=True)  # epochs changed: refused, nothing rewritten
    cfg = TrainConfig(epochs=2, batch_size=8, patience=None, max_steps_per_epoch=2)
    trainer = Trainer(net2, data, "famo", cfg, run_dir=tmp_path, progress=False, device="cpu")
    with audit:
        assert trainer.resume()
        trainer.finish()
    assert audit.unplaced == set()


# ----------------------------------------------------------------------------- resolution
def test_resolve_device_on_this_machine() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected
    assert resolve_device(None) == expected


def test_resolve_device_errors_name_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"^unknown device 'gpu'; valid: auto, cpu, cuda, cuda:N, mps$"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match=r"unsupported device 'xpu'; valid: auto, cpu"):
        resolve_device("xpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"^device 'cuda:1' asked for, but torch sees no CUDA GPU \(.*torch "):
        resolve_device("cuda:1")
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"torch sees no Apple MPS device; use --device cpu"):
        resolve_device("mps")


def test_cuda_index_follows_torchrun_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    # What resolve_device decides on a 2-GPU node, without one: availability and count are faked.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"cuda:2 does not exist: this machine has 2 CUDA device\(s\) \(cuda:0 to"):
        resolve_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer, got 'x'"):
        resolve_device("cuda")


def test_backend_follows_the_device() -> None:
    from polytask.train._distributed import choose_backend

    assert choose_backend(torch.device("cpu")) == "gloo"
    expected = "nccl" if torch.distributed.is_nccl_available() else "gloo"
    assert choose_backend(torch.device("cuda", 1)) == expected


# ----------------------------------------------------------------------------- CLI
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
@pytest.mark.parametrize("command", ["fit", "sweep", "compare"])
def test_cli_refuses_a_missing_gpu_before_writing_anything(command: str, tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a,b,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(30)))
    out = tmp_path / "out"
    args = [command, str(table), "--task", "y:binary", "--device", "cuda", "--epochs", "1"]
    if command == "sweep":
        space = tmp_path / "space.yaml"
        space.write_text("train:\n  lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
        args += ["--space", str(space), "--trials", "1"]
    if command != "compare":
        args += ["--output", str(out)]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: device 'cuda' asked for, but torch sees no CUDA GPU")
    assert not out.exists()


def test_cli_bench_refuses_an_unknown_device_before_storing(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["bench", "multimnist", "--device", "tpu", "--output", str(tmp_path / "b")])
    assert res.exit_code == 2, res.output
    assert "error: unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N, mps" in res.output
    assert not (tmp_path / "b").exists()


def test_cli_fit_evaluate_predict_on_cpu(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a,b,y,z\n" + "".join(f"{i},{i % 3},{i % 2},{i * 0.5}\n" for i in range(40)))
    out = tmp_path / "run"
    base = ["fit", str(table), "--task", "y:binary", "--task", "z:regression", "--epochs", "1", "--quiet"]
    res = CliRunner().invoke(cli, [*base, "--device", "cpu", "--output", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "results.json").read_text())["device"] == "cpu"
    res = CliRunner().invoke(cli, ["evaluate", str(out), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.output)["metrics"]) == {"val", "test"}
    res = CliRunner().invoke(cli, ["predict", str(out), str(table), "--device", "cpu", "-o", str(tmp_path / "p.csv")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["evaluate", str(out), "--device", "cuda:x"])
    assert res.exit_code == 2 and "error: unknown device 'cuda:x'" in res.output
