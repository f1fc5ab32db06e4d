"""The streaming merge engine: files and folders, checks before work, atomic output, the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polytask.cli import cli
from polytask.merge import (
    DATA_DRIVEN,
    MERGE_METHODS,
    layer_index,
    merge,
    merge_checkpoints,
    merge_state_dicts,
)
from polytask.merge._io import OutputWriter


def _state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.layer.0.weight": scale * torch.randn(12, 8, generator=g),
        "encoder.layer.1.weight": scale * torch.randn(12, 8, generator=g),
        "encoder.layer.1.bias": scale * torch.randn(12, generator=g),
        "embeddings.weight": scale * torch.randn(20, 8, generator=g),
        "position_ids": torch.arange(6),
    }


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, list[Path], dict, list[dict]]:
    base = _state(0)
    models = []
    for i in range(3):
        d = _state(10 + i, 0.05)
        models.append({k: base[k] + d[k] if base[k].is_floating_point() else base[k] for k in base})
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"ft{i}.safetensors")
        paths.append(tmp_path / f"ft{i}.safetensors")
    return tmp_path / "base.safetensors", paths, base, models


def _no_temp_left(folder: Path) -> None:
    assert not [p for p in folder.iterdir() if p.name.endswith((".tmp", ".old"))]


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task-arithmetic", {"lam": 0.4}),
        ("ties", {"density": 0.3, "topk": "model"}),
        ("ties", {"density": 0.3, "topk": "tensor"}),
        ("dare", {"density": 0.5, "combine": "ties", "seed": 1}),
        ("pcb", {"ratio": 0.2}),
        ("lines", {"on": "ties"}),
        ("model-stock", {}),
        ("consensus", {}),
        ("breadcrumbs", {}),
        ("average", {}),
    ],
)
def test_file_output_equals_in_memory_bit_for_bit(files, tmp_path: Path, method: str, params: dict) -> None:
    base_path, paths, base, models = files
    out = merge_checkpoints(method, base_path, paths, tmp_path / "out.safetensors", **params)
    on_disk = load_file(out)
    in_memory = merge_state_dicts(method, base, models, **params)
    assert list(on_disk) == sorted(base)  # written in name order
    for k in base:
        assert torch.equal(on_disk[k], in_memory[k]), k
    assert torch.equal(on_disk["position_ids"], base["position_ids"])  # integer buffers: the base's copy
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["polytask_merge_method"] == method
    _no_temp_left(tmp_path)


def test_early_writeback_keeps_the_output_intact(files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer hands every written range to the disk as it goes (sync_file_range on Linux)."""
    import polytask.merge._io as io

    calls: list[tuple[int, int]] = []
    real = io._SYNC_RANGE

    def spy(fd: int, offset: int, nbytes: int, flags: int) -> int:
        calls.append((offset, nbytes))
        return real(fd, offset, nbytes, flags) if real is not None else 0

    monkeypatch.setattr(io, "_SYNC_RANGE", spy)
    monkeypatch.setattr(io, "_SYNC_CHUNK", 1)  # after every tensor
    base_path, paths, base, models = files
    out = load_file(merge_checkpoints("ties", base_path, paths, tmp_path / "out.safetensors", density=0.3))
    in_memory = merge_state_dicts("ties", base, models, density=0.3)
    for k in base:
        if k != "position_ids":
            assert torch.equal(out[k], in_memory[k]), k
    assert len(calls) == len(base)
    # consecutive ranges from the first byte on, each starting where the previous one ended
    assert calls[0][0] == 0 and all(a + n == b for (a, n), (b, _) in itertools.pairwise(calls))


def test_output_dtype_and_existing_output(files, tmp_path: Path) -> None:
    base_path, paths, base, models = files
    out = tmp_path / "bf16.safetensors"
    merge_checkpoints("task-arithmetic", base_path, paths, out, dtype="bf16")
    sd = load_file(out)
    assert sd["embeddings.weight"].dtype == torch.bfloat16 and sd["position_ids"].dtype == torch.int64
    ref = merge_state_dicts("task-arithmetic", base, models)["embeddings.weight"].to(torch.bfloat16)
    assert torch.equal(sd["embeddings.weight"], ref)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"bf16.safetensors already exists; pass overwrite=True"):
        merge_checkpoints("task-arithmetic", base_path, paths, out)
    assert out.read_bytes() == before
    merge_checkpoints("task-arithmetic", base_path, paths, out, overwrite=True, dtype="float32")
    assert load_file(out)["embeddings.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        merge_checkpoints("task-arithmetic", base_path, paths, tmp_path / "x.safetensors", dtype="int4")


def test_mismatches_refused_before_anything_is_written(files, tmp_path: Path) -> None:
    base_path, paths, base, _ = files
    out = tmp_path / "never.safetensors"
    cases = {
        "shape": ({**base, "encoder.layer.1.bias": torch.zeros(13)}, "tensor 'encoder.layer.1.bias' has shape (13,)"),
        "dtype": (
            {**base, "embeddings.weight": base["embeddings.weight"].half()},
            "tensor 'embeddings.weight' is float16 in",
        ),
        "missing": ({k: v for k, v in base.items() if k != "embeddings.weight"}, "lacks tensor 'embeddings.weight'"),
        "extra": ({**base, "head.weight": torch.zeros(2)}, "has tensor 'head.weight' that the base model"),
    }
    for name, (sd, message) in cases.items():
        bad = tmp_path / f"bad-{name}.safetensors"
        save_file(sd, bad)
        with pytest.raises(ValueError) as e:
            merge_checkpoints("ties", base_path, [paths[0], bad], out)
        assert message in e.value.args[0] and str(bad) in e.value.args[0], e.value.args[0]
        assert not out.exists()
    _no_temp_left(tmp_path)


def test_failure_mid_merge_leaves_no_output(files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_path, paths, _, _ = files
    fn = MERGE_METHODS["task-arithmetic"].cls
    seen = []

    def boom(*a, **kw):
        seen.append(1)
        if len(seen) == 3:
            raise RuntimeError("disk on fire")
        return fn(*a, **kw)

    monkeypatch.setitem(MERGE_METHODS._entries, "task-arithmetic", MERGE_METHODS["task-arithmetic"].__class__(
        "task-arithmetic", boom, "p", "d", dict(MERGE_METHODS["task-arithmetic"].defaults)))  # fmt: skip
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_checkpoints("task-arithmetic", base_path, paths, tmp_path / "o.safetensors")
    with pytest.raises(RuntimeError, match="disk on fire"):
        seen.clear()
        merge_checkpoints("task-arithmetic", base_path, paths, tmp_path / "folder")
    assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "folder").exists()
    _no_temp_left(tmp_path)


def test_pickle_and_missing_models_refused(files, tmp_path: Path) -> None:
    base_path, _, base, _ = files
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(base, folder / "pytorch_model.bin")  # written only; polytask never loads it
    for model in (folder, folder / "pytorch_model.bin"):
        with pytest.raises(ValueError) as e:
            merge_checkpoints("task-arithmetic", base_path, [model], tmp_path / "o.safetensors")
        msg = e.value.args[0]
        assert "pytorch_model.bin is a pickle checkpoint" in msg and "safe_serialization=True" in msg
    renamed = tmp_path / "sneaky.safetensors"
    renamed.write_bytes((folder / "pytorch_model.bin").read_bytes())
    with pytest.raises(ValueError, match=r"sneaky\.safetensors is a pickle checkpoint"):
        merge_checkpoints("task-arithmetic", base_path, [renamed], tmp_path / "o.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model file .*ghost.safetensors does not exist"):
        merge_checkpoints("task-arithmetic", base_path, [tmp_path / "ghost.safetensors"], tmp_path / "o.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match=r"junk\.safetensors is not a valid safetensors file"):
        merge_checkpoints("task-arithmetic", base_path, [junk], tmp_path / "o.safetensors")


def test_sharded_folder_input_and_folder_output(files, tmp_path: Path) -> None:
    base_path, paths, base, models = files
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    names = sorted(models[0])
    parts = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in parts.items():
        save_file({k: models[0][k] for k in keys}, shard_dir / shard)
    weight_map = {k: shard for shard, keys in parts.items() for k in keys}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shard_dir / "config.json").write_text('{"model_type": "toy"}')
    out = merge_checkpoints("ties", base_path, [shard_dir, paths[1]], tmp_path / "merged", density=0.5)
    assert (out / "config.json").read_text() == '{"model_type": "toy"}'
    assert not (out / "model.safetensors.index.json").exists()
    ref = merge_state_dicts("ties", base, [models[0], models[1]], density=0.5)
    got = load_file(out / "model.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_layer_index_from_parameter_names() -> None:
    assert layer_index("bert.encoder.layer.11.attention.self.query.weight") == 11
    assert layer_index("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_index("embeddings.word_embeddings.weight") is None


def test_writer_aborts_cleanly(tmp_path: Path) -> None:
    entries = [("a", (2,), torch.float32), ("b", (3,), torch.float32)]
    with pytest.raises(RuntimeError, match="writer expected a"), OutputWriter(tmp_path / "w.safetensors", entries) as w:
        w.write("b", torch.zeros(3))
    _no_temp_left(tmp_path)
    with OutputWriter(tmp_path / "w.safetensors", entries) as w:
        w.write("a", torch.tensor([1.0, 2.0]))
        w.write("b", torch.tensor([3.0, 4.0, 5.0]))
        w.commit()
    assert load_file(tmp_path / "w.safetensors")["b"].tolist() == [3.0, 4.0, 5.0]


def test_data_driven_methods_need_data() -> None:
    if not DATA_DRIVEN:
        pytest.skip("no data-driven method registered")
    name = sorted(DATA_DRIVEN)[0]
    with pytest.raises(ValueError, match=f"merge method '{name}' is data-driven: pass data="):
        merge_state_dicts(name, {"w": torch.zeros(2)}, [{"w": torch.ones(2)}])
    with pytest.raises(ValueError, match="merge method 'ties' is data-free and takes no data"):
        merge_state_dicts("ties", {"w": torch.zeros(2)}, [{"w": torch.ones(2)}], data=object())


def test_tiny_bert_merges_and_loads_in_transformers(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    base = transformers.BertModel(cfg)
    base.save_pretrained(tmp_path / "base", safe_serialization=True)
    ft = []
    for i in range(2):
        m = transformers.BertModel(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        m.save_pretrained(tmp_path / f"ft{i}", safe_serialization=True)
        ft.append(f"ft{i}")
    config = {
        "method": "lines",
        "base": "base",
        "models": [{"path": ft[0], "weight": 1.0}, {"path": ft[1], "weight": 0.5}],
        "params": {"alpha": 0.5, "beta": 0.5},
        "output": "merged",
        "dtype": "float32",
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    res = CliRunner().invoke(cli, ["merge", str(tmp_path / "merge.yaml"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "merged model written to" in res.output
    merged = transformers.BertModel.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        out = merged(input_ids=torch.tensor([[1, 5, 7, 2]])).last_hidden_state
    assert torch.isfinite(out).all()
    # LiNeS moved deeper layers further from the base than the embeddings
    b, m = base.state_dict(), merged.state_dict()
    f0 = transformers.BertModel.from_pretrained(tmp_path / ft[0]).state_dict()
    key_emb, key_l1 = "embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"
    assert not torch.equal(m[key_emb], b[key_emb])
    assert (m[key_l1] - b[key_l1]).norm() / (f0[key_l1] - b[key_l1]).norm() > (m[key_emb] - b[key_emb]).norm() / (
        f0[key_emb] - b[key_emb]
    ).norm()
    # the Python API takes the same config
    again = merge({**config, "base": str(tmp_path / "base"), "models": [str(tmp_path / f) for f in ft],
                   "output": str(tmp_path / "again.safetensors")})  # fmt: skip
    assert again.is_file()


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["merge", *map(str, args)])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


def test_cli_list_shows_every_method_with_paper() -> None:
    code, out = _cli("--list")
    assert code == 0
    for name, e in MERGE_METHODS.items():
        assert name in out and e.paper in out
    assert "params: density=0.2, lam=1.0" in out or "params: lam=1.0, density=0.2" in out


def test_cli_bad_inputs_one_line_exit_2(files, tmp_path: Path) -> None:
    base_path, paths, _, _ = files

    def cfg(**over) -> Path:
        doc = {"method": "ties", "base": str(base_path), "models": [str(p) for p in paths],
               "output": str(tmp_path / "out.safetensors"), **over}  # fmt: skip
        doc = {k: v for k, v in doc.items() if v is not None}
        path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    cases = [
        (cfg(method="magic"), "'method' 'magic' is not a merge method; available:"),
        (cfg(params={"density": 1.5}), "merge method 'ties': density=1.5 is out of range (0, 1]"),
        (cfg(params={"lam": 0}), "merge method 'ties': lam=0 is out of range"),
        (cfg(params={"alpha": 1}), "'params.alpha' is not a parameter of 'ties'; valid: density, lam, topk, weights"),
        (cfg(models=[str(tmp_path / "nope.safetensors")]), "'models[0]':"),
        (cfg(models=[{"path": str(paths[0]), "wieght": 2}]), "'models[0].wieght' is not a per-model key"),
        (cfg(models=[{"path": str(paths[0]), "weight": 2}], method="model-stock"), "takes no per-model weights"),
        (cfg(output=None), "'output' is missing"),
        (cfg(dtype="int3"), "'dtype' unknown dtype 'int3'"),
        (cfg(colour="blue"), "'colour' is not a merge config key"),
        (tmp_path / "absent.yaml", "merge config"),
    ]
    for path, message in cases:
        code, out = _cli(path)
        assert code == 2, out
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out
    (tmp_path / "broken.yaml").write_text("method: [unclosed")
    code, out = _cli(tmp_path / "broken.yaml")
    assert code == 2 and "is not valid YAML at line 1" in out
    code, out = _cli(cfg())
    assert code == 0, out
    code, out = _cli(cfg())
    assert code == 2 and "already exists; pass overwrite=True (--overwrite)" in out
    code, out = _cli(cfg(), "--overwrite")
    assert code == 0, out
    code, out = _cli()
    assert code == 2 and "give a merge config file" in out


def test_data_driven_results_written_from_files(files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polytask._registry import Entry

    base_path, paths, base, models = files
    got: dict = {}

    def fake(base_sd, model_sds, *, data, scale):
        got.update(data=data, n=len(model_sds), keys=sorted(base_sd))
        if data == "front":
            return [((1.0, 0.0), dict(model_sds[0])), ((0.0, 1.0), dict(model_sds[1]))]
        if data == "map-front":  # MAP's shape: {task: weight} preferences
            return [({"a": 0.25, "b": 0.75}, dict(model_sds[0]))]
        return {
            **{k: v * scale if v.is_floating_point() else v for k, v in base_sd.items()},
            "extra.router": torch.ones(2),
        }

    monkeypatch.setitem(MERGE_METHODS._entries, "fake-dd", Entry("fake-dd", fake, "p", "d", {"scale": 1.0}))
    DATA_DRIVEN.add("fake-dd")  # removed in the finally below
    try:
        with pytest.raises(ValueError, match="merge method 'fake-dd' is data-driven: its config needs a 'data:'"):
            merge_checkpoints("fake-dd", base_path, paths, tmp_path / "dd.safetensors")
        out = merge_checkpoints("fake-dd", base_path, paths, tmp_path / "dd.safetensors", data="d", scale=2.0)
        sd = load_file(out)
        assert got == {"data": "d", "n": 3, "keys": sorted(base)}
        assert torch.equal(sd["embeddings.weight"], 2 * base["embeddings.weight"]) and "extra.router" in sd
        front = merge_checkpoints("fake-dd", base_path, paths[:2], tmp_path / "front", data="front")
        prefs = json.loads((front / "preferences.json").read_text())
        assert prefs == [{"model": "model-0", "preference": [1.0, 0.0]}, {"model": "model-1", "preference": [0.0, 1.0]}]
        assert torch.equal(
            load_file(front / "model-1" / "model.safetensors")["embeddings.weight"], models[1]["embeddings.weight"]
        )
        front = merge_checkpoints("fake-dd", base_path, paths[:2], tmp_path / "map-front", data="map-front")
        prefs = json.loads((front / "preferences.json").read_text())
        assert prefs == [{"model": "model-0", "preference": {"a": 0.25, "b": 0.75}}]
        cfg = {
            "method": "fake-dd",
            "base": str(base_path),
            "models": [str(p) for p in paths],
            "output": "o.safetensors",
        }
        (tmp_path / "dd.yaml").write_text(yaml.safe_dump(cfg))
        code, text = _cli(tmp_path / "dd.yaml")
        assert code == 2 and "'data' must be a mapping: 'fake-dd' is data-driven" in text
    finally:
        DATA_DRIVEN.discard("fake-dd")
    _no_temp_left(tmp_path)


def test_overwrite_replaces_folder_with_file_and_back(files, tmp_path: Path) -> None:
    base_path, paths, _, _ = files
    out = tmp_path / "out"
    merge_checkpoints("average", base_path, paths, out)
    assert (out / "model.safetensors").is_file()
    merge_checkpoints("average", base_path, paths, out, overwrite=True)  # folder over folder
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    file_out = tmp_path / "m.safetensors"
    file_out.mkdir()  # a folder where a file is wanted
    merge_checkpoints("average", base_path, paths, file_out, overwrite=True)
    assert file_out.is_file()
    _no_temp_left(tmp_path)


def test_safetensors_header_that_looks_like_a_pickle_is_accepted(tmp_path: Path) -> None:
    from polytask.merge._io import _safetensors_header

    entries = [("w", (2,), torch.float32)]
    pad = next(p for p in range(600) if len(_safetensors_header(entries, {"format": "pt", "x": "y" * p})) == 8 + 640)
    path = tmp_path / "odd.safetensors"
    with OutputWriter(path, entries, metadata={"x": "y" * pad}) as w:
        w.write("w", torch.tensor([1.0, 2.0]))
        w.commit()
    assert path.read_bytes()[:2] == b"\x80\x02"  # header length 640: the bytes of a pickle's protocol mark
    out = merge_state_dicts("average", {"w": torch.zeros(2)}, [load_file(path)])
    merged = merge_checkpoints("average", path, [path], tmp_path / "o.safetensors")
    assert torch.equal(load_file(merged)["w"], out["w"])
