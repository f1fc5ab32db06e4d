"""Text through the CLI: the ``glue`` data set and the ``text`` model (a Hugging Face encoder from a
folder), fitted, evaluated, predicted and resumed on a tiny random BERT and GLUE-format files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("transformers")
from transformers import BertTokenizer

from polytask.cli import cli
from polytask.data import load_dataset
from polytask.nn import MODELS, build_model
from polytask.train import TrainConfig, Trainer
from test_device import PlacementAudit
from test_text import FILES, save_tiny_bert, write_glue_files, write_vocab


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text-cli")
    write_glue_files(root / "data")
    save_tiny_bert(root / "encoder", BertTokenizer(str(write_vocab(root / "vocab.txt"))), hidden=16, layers=1)
    return {"data": root / "data", "encoder": root / "encoder", "root": root}


def _data_args(a: dict[str, Path]) -> list[str]:
    return [
        "--data-param", f"data_dir={a['data']}", "--data-param", f"tokenizer={a['encoder']}",
        "--data-param", "val_size=2", "--data-param", "max_length=16",
    ]  # fmt: skip


def _invoke(*args: object) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def test_text_model_is_registered_with_its_defaults() -> None:
    entry = MODELS["text"]
    assert entry.defaults == {"encoder": None, "freeze_word_embeddings": True, "head_dropout": 0.0}
    assert "Sentence-BERT" in entry.paper


def test_glue_fit_evaluate_predict_and_resume(assets: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit = ["fit", "glue", "--task", "sst2", "--task", "stsb", *_data_args(assets), "--model", "text",
           "--model-param", f"encoder={assets['encoder']}", "--epochs", "2", "--batch-size", "4", "--lr", "0.01",
           "--device", "cpu", "--quiet", "-o", run]  # fmt: skip
    code, out = _invoke(*fit)
    assert code == 0, out
    results = json.loads((run / "results.json").read_text())
    assert [t["name"] for t in results["tasks"]] == ["sst2", "stsb"]
    assert set(results["test"]) == {"sst2", "stsb"} and "accuracy" in results["test"]["sst2"]
    assert results["epochs_run"] == 2
    # evaluate reloads the same splits with the saved data options (data folder, tokenizer, sizes)
    code, out = _invoke("evaluate", run, "--json", "--device", "cpu")
    assert code == 0, out
    metrics = json.loads(out[out.index("{") :])["metrics"]
    for split in ("val", "test"):
        for task, ms in results[split].items():
            assert metrics[split][task] == pytest.approx(ms, rel=1e-5, nan_ok=True)
    # predict on the run's own built-in set: its test split (GLUE dev) with the saved options
    code, out = _invoke("predict", run, "glue", "-o", tmp_path / "p.csv", "--device", "cpu")
    assert code == 0, out
    pred = pd.read_csv(tmp_path / "p.csv")
    dev_rows = len(FILES["SST-2"]) - 1 + len(FILES["STS-B"]) - 1  # header lines excluded
    assert len(pred) == dev_rows and {"sst2", "sst2:label", "stsb"} <= set(pred.columns)
    # a resumed, finished run trains nothing more and reports the same
    code, out = _invoke(*fit, "--resume")
    assert code == 0, out
    again = json.loads((run / "results.json").read_text())
    assert again["epochs_run"] == 2
    for task, ms in results["test"].items():
        assert again["test"][task] == pytest.approx(ms, nan_ok=True)


def test_text_model_bad_input_gets_one_line_errors(assets: dict[str, Path], tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("a,y\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    code, out = _invoke("fit", table, "--task", "y:binary", "--model", "text", "-o", tmp_path / "r1")
    assert code == 2 and out.strip().startswith("error: model 'text' reads tokenized text (e.g. the glue data set)")
    code, out = _invoke("fit", "glue", *_data_args(assets), "--model", "text",
                        "--model-param", f"encoder={tmp_path}", "-o", tmp_path / "r2")  # fmt: skip
    assert code == 2 and f"error: {tmp_path}: not a Hugging Face model folder (no config.json)" in out
    code, out = _invoke("fit", "glue", "--data-param", f"tokenizer={tmp_path}", "-o", tmp_path / "r3")
    assert code == 2 and "not a Hugging Face model folder" in out
    assert not (tmp_path / "r2" / "checkpoints").exists()


def test_text_model_places_its_tensors_on_the_training_device(assets: dict[str, Path]) -> None:
    data = _glue(assets)
    net = build_model("text", data.tasks, data.input_spec)  # the encoder of the data's tokenizer folder
    cfg = TrainConfig(epochs=1, batch_size=4, patience=None, max_steps_per_epoch=2)
    trainer = Trainer(net, data, "upgrad", cfg, progress=False, device="cpu")
    audit = PlacementAudit()
    with audit:
        trainer.fit()
    assert audit.unplaced == set()


TEXT_ARCHITECTURES = {
    "single": {"hidden": (8,), "tower_hidden": (4,)},
    "shared-bottom": {"hidden": (8,), "tower_hidden": (4,)},
    "mmoe": {"n_experts": 2, "expert_hidden": (8,), "tower_hidden": (4,)},
    "cgc": {"n_shared_experts": 1, "n_task_experts": 1, "expert_hidden": (8,), "tower_hidden": (4,)},
    "ple": {"n_shared_experts": 1, "n_task_experts": 1, "expert_hidden": (8,), "tower_hidden": (4,)},
    "home": {"n_shared_experts": 1, "n_group_experts": 1, "expert_hidden": (8,), "feature_gate_rank": 2},
    "dselect-k": {"n_experts": 3, "k": 2, "expert_hidden": (8,), "tower_hidden": (4,)},
    "cross-stitch": {"hidden": (8,), "tower_hidden": (4,)},
}


def _glue(assets: dict[str, Path]) -> Any:
    data = load_dataset("glue", data_dir=assets["data"], tokenizer=assets["encoder"], val_size=2, max_length=16)
    return data.select_tasks(["sst2", "stsb", "rte"]).labelled_rows_only()


@pytest.mark.parametrize("name", sorted(TEXT_ARCHITECTURES))
def test_shared_architectures_read_text_through_the_data_encoder(name: str, assets: dict[str, Path]) -> None:
    data = _glue(assets)
    assert data.input_spec.encoder == str(assets["encoder"].resolve())
    torch.manual_seed(0)
    net = build_model(name, data.tasks, data.input_spec, **TEXT_ARCHITECTURES[name])
    encoders = [m for m in net.modules() if type(m).__name__ == "BertModel"]
    # one pretrained encoder per task for the networks that share nothing, one in all for the others
    assert len(encoders) == (3 if name in ("single", "cross-stitch") else 1)
    assert all(not e.get_input_embeddings().weight.requires_grad for e in encoders)  # frozen word embeddings
    cfg = TrainConfig(epochs=1, batch_size=4, patience=None, max_steps_per_epoch=2)
    trainer = Trainer(net, data, "upgrad" if name != "single" else "equal", cfg, progress=False, device="cpu")
    audit = PlacementAudit()
    with audit:
        res = trainer.fit()
    assert audit.unplaced == set()
    assert set(res.test) == {"sst2", "stsb", "rte"}


@pytest.mark.parametrize("name", ["controllable", "mod-squad", "m3vit", "mtan", "multitab", "esmm"])
def test_architectures_without_a_text_path_refuse_it(name: str, assets: dict[str, Path]) -> None:
    data = _glue(assets)
    with pytest.raises(ValueError) as err:
        build_model(name, data.tasks, data.input_spec)
    assert "\n" not in str(err.value) and ("text" in str(err.value) or "image" in str(err.value))


def test_compare_on_glue_reports_gains_against_single_task_encoders(assets: dict[str, Path], tmp_path: Path) -> None:
    code, out = _invoke("compare", "glue", "--task", "sst2", "--task", "stsb", *_data_args(assets),
                        "--models", "single,shared-bottom", "--epochs", "1", "--batch-size", "4",
                        "--device", "cpu", "--quiet", "-o", tmp_path / "cmp")  # fmt: skip
    assert code == 0, out
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert set(summary["test"]) == {"single", "shared-bottom"}
    assert "Δm" in out


def test_token_inputs_are_evaluated_a_few_hundred_rows_at_a_time() -> None:
    from polytask.train._trainer import TEXT_EVAL_ROWS, predict_model

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.task_names = ["a"]
            self.w = torch.nn.Parameter(torch.ones(()))
            self.sizes: list[int] = []

        def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            n = next(iter(x.values())).shape[0]
            self.sizes.append(n)
            return {"a": self.w * torch.ones(n)}

    probe = Probe()
    ids = torch.ones(1000, 8, dtype=torch.long)
    out = predict_model(probe, {"input_ids": ids, "attention_mask": ids}, batch_size=4096)  # type: ignore[arg-type]
    assert probe.sizes == [TEXT_EVAL_ROWS] * 3 + [1000 - 3 * TEXT_EVAL_ROWS] and out["a"].shape == (1000,)
    probe.sizes.clear()
    predict_model(probe, {"num": torch.ones(1000, 2)}, batch_size=4096)  # type: ignore[arg-type]
    assert probe.sizes == [1000]  # tables keep the configured evaluation batch
