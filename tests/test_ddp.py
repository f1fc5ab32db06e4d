"""Data-parallel training: a 2-process gloo step equals a 1-process step on the concatenated batch.

The workers run in processes started with torch.multiprocessing (spawn), rendezvous on a free local
port, and write their parameters and gradients to safetensors for the parent to compare.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from polytask.data import DataBundle, InputSpec, TaskTensors
from polytask.nn import build_model
from polytask.tasks import Task
from polytask.train import TrainConfig, Trainer, evaluate, load_run
from polytask.train._distributed import shard

TABLE_TASKS = ["buy:binary", "spend:regression"]
BALANCERS = ("equal", "uncertainty", "dwa", "famo", "upgrad", "pcgrad", "imtl-g")
N_ROWS = 11  # odd: the two ranks get 6 and 5 rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bundle() -> DataBundle:
    g = torch.Generator().manual_seed(1)
    tasks = [Task("buy", "binary"), Task("spend", "regression")]
    x = {"num": torch.randn(N_ROWS, 5, generator=g, dtype=torch.float64), "cat": torch.zeros(N_ROWS, 0).long()}
    y = {"buy": (torch.rand(N_ROWS, generator=g) > 0.5).double(), "spend": torch.randn(N_ROWS, generator=g).double()}
    # Missing labels spread unevenly over the two shards (rank 0: rows 0-5, rank 1: rows 6-10).
    mask = {
        "buy": torch.ones(N_ROWS, dtype=torch.bool),
        "spend": torch.tensor([1, 0, 0, 0, 1, 0, 1, 1, 1, 1, 0]).bool(),
    }
    split = TaskTensors(x, y, mask)
    return DataBundle("toy", tasks, InputSpec("tabular", n_numeric=5, cardinalities=()), split, split)


def _one_step(balancer: str) -> dict[str, torch.Tensor]:
    """Build a float64 model, take one trainer step on this rank's shard; parameters and gradients."""
    bundle = _bundle()
    torch.manual_seed(0)
    model = build_model("shared-bottom", bundle.tasks, bundle.input_spec, hidden=(8, 6), tower_hidden=(4,)).double()
    trainer = Trainer(model, bundle, balancer, TrainConfig(lr=0.05, batch_size=N_ROWS), progress=False)
    trainer.balancer.double()
    ctx = trainer.dist
    batch = bundle.train.take(shard(torch.arange(N_ROWS), ctx))
    # A second step so that AdamW's update depends on the gradient's scale, not only on its sign.
    for _ in range(2):
        trainer.step(batch)
    out: dict[str, torch.Tensor] = {}
    for name, p in [*model.named_parameters(), *(("balancer." + n, q) for n, q in trainer.balancer.named_parameters())]:
        out[f"param.{name}"] = p.detach().clone().contiguous()
        if p.grad is not None:
            out[f"grad.{name}"] = p.grad.detach().clone().contiguous()
    return out


def _global_losses() -> dict[str, torch.Tensor]:
    bundle = _bundle()
    torch.manual_seed(0)
    model = build_model("shared-bottom", bundle.tasks, bundle.input_spec, hidden=(8,), tower_hidden=()).double()
    trainer = Trainer(model, bundle, "equal", TrainConfig(batch_size=N_ROWS), progress=False)
    losses, _ = trainer.step(bundle.train.take(shard(torch.arange(N_ROWS), trainer.dist)))
    return {t: v.reshape(1) for t, v in losses.items()}


class _Crash(RuntimeError):
    pass


def _interrupted_then_resumed_fit(out_dir: str) -> None:
    """A 2-epoch DDP fit that dies after epoch 1's checkpoint on every rank, then ``resume``."""
    from polytask.train import fit

    def crash(self: Trainer) -> None:
        original(self)
        raise _Crash

    original = Trainer._sync_bad_epochs
    kw = {"balancer": "equal", "output": Path(out_dir, "resumed"), "progress": False,
          "config": TrainConfig(epochs=2, batch_size=64)}  # fmt: skip
    Trainer._sync_bad_epochs = crash  # type: ignore[method-assign]
    try:
        fit(str(Path(out_dir, "t.csv")), TABLE_TASKS, **kw)
    except _Crash:
        # Epoch 1 is on disk, epoch 2 is not: what a killed job leaves behind.
        assert not Path(out_dir, "resumed", "results.json").exists()
        Path(out_dir, f"crashed{dist.get_rank()}").touch()
    finally:
        Trainer._sync_bad_epochs = original  # type: ignore[method-assign]
    fit(str(Path(out_dir, "t.csv")), TABLE_TASKS, resume=True, **kw)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name in BALANCERS:
            result = _one_step(name)
            if rank == 0:
                save_file(result, os.path.join(out_dir, f"{name}.safetensors"))
        save_file(_global_losses(), os.path.join(out_dir, f"losses{rank}.safetensors"))
        bundle = _bundle()
        try:
            Trainer(build_model("shared-bottom", bundle.tasks, bundle.input_spec), bundle, "gradnorm", progress=False)
        except ValueError as e:
            Path(out_dir, f"refused{rank}.txt").write_text(str(e))
        _interrupted_then_resumed_fit(out_dir)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp-steps")
    _table(out / "t.csv")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("balancer", BALANCERS)
def test_two_process_step_equals_one_process_step_on_whole_batch(two_process_steps: Path, balancer: str) -> None:
    one = _one_step(balancer)  # no process group here: the plain one-process trainer on all 11 rows
    two = load_file(two_process_steps / f"{balancer}.safetensors")
    assert set(one) == set(two)
    assert any(k.startswith("grad.") for k in one)
    for key, ref in one.items():
        torch.testing.assert_close(two[key], ref, rtol=1e-9, atol=1e-10, msg=f"{balancer}: {key} differs")
    if balancer == "uncertainty":
        # The learned log-variances moved: their gradient reads the global loss values.
        assert not torch.equal(one["param.balancer.log_var"], torch.zeros(2, dtype=torch.float64))


def test_every_rank_reads_the_global_batch_loss(two_process_steps: Path) -> None:
    ref = _global_losses()
    for rank in (0, 1):
        got = load_file(two_process_steps / f"losses{rank}.safetensors")
        for t, v in ref.items():
            assert float(got[t]) == pytest.approx(float(v), rel=1e-12), (rank, t)


def test_representation_level_balancer_is_refused_under_ddp(two_process_steps: Path) -> None:
    for rank in (0, 1):
        msg = (two_process_steps / f"refused{rank}.txt").read_text()
        assert msg.startswith("this balancer reads per-sample representation gradients"), msg


def test_shard_splits_a_global_batch_into_disjoint_contiguous_parts() -> None:
    from polytask.train._distributed import DistContext

    idx = torch.tensor([7, 3, 9, 1, 4])
    parts = [shard(idx, DistContext(r, 2, "gloo")).tolist() for r in (0, 1)]
    assert parts == [[7, 3, 9], [1, 4]]
    assert shard(idx, None).tolist() == idx.tolist()


def _table(path: Path, n: int = 400) -> Path:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n)})
    df["buy"] = ((df.x1 + rng.normal(size=n) * 0.5) > 0).astype(int)
    df["spend"] = df.x1 * 2 + df.x2 + rng.normal(size=n) * 0.1
    df.loc[rng.random(n) < 0.3, "spend"] = np.nan
    df.to_csv(path, index=False)
    return path


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), "-m", "polytask", "fit", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def _one_process_fit(data: Path, balancer: str, out: Path) -> dict[str, torch.Tensor]:
    from polytask.train import fit

    fit(str(data), TABLE_TASKS, balancer=balancer, output=out, progress=False,
        config=TrainConfig(epochs=2, batch_size=64))  # fmt: skip
    return load_run(out).model.state_dict()


def test_interrupted_ddp_fit_resumes_to_the_one_process_result(two_process_steps: Path, tmp_path: Path) -> None:
    run = two_process_steps / "resumed"
    assert (two_process_steps / "crashed0").exists() and (two_process_steps / "crashed1").exists()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads((run / "results.json").read_text())["epochs_run"] == 2
    ref = _one_process_fit(two_process_steps / "t.csv", "equal", tmp_path / "one")
    got = load_run(run).model.state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_torchrun_fit_writes_one_run_that_loads(tmp_path: Path) -> None:
    data = _table(tmp_path / "t.csv")
    args = [str(data), "--task", "buy:binary", "--task", "spend:regression", "--epochs", "2", "--batch-size", "64",
            "--balancer", "upgrad", "--quiet"]  # fmt: skip
    res = _torchrun(*args, "-o", str(tmp_path / "ddp"))
    assert res.returncode == 0, res.stderr[-3000:]
    # Rank 0 alone reports and writes: one summary line, one metrics line per epoch.
    assert res.stdout.count("best epoch:") == 1, res.stdout
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert set(json.loads(lines[0])["grad_cosine"]) == {"buy", "spend"}
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    # The checkpoint loads in a plain process and evaluates to the numbers rank 0 wrote.
    metrics = evaluate(tmp_path / "ddp")
    for t in ("buy", "spend"):
        for m, v in results["test"][t].items():
            assert metrics["test"][t][m] == pytest.approx(v, rel=1e-6, abs=1e-9), (t, m)
    # The same fit in one process reaches the same weights (same global batches, averaged gradients).
    b = _one_process_fit(data, "upgrad", tmp_path / "one")
    a = load_run(tmp_path / "ddp").model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_world_size_without_rendezvous_variables_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from polytask.train._distributed import init_from_env

    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError) as e:
        init_from_env()
    assert str(e.value) == (
        "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set; launch with torchrun "
        "(e.g. torchrun --nproc-per-node 2 -m polytask fit ...)"
    )
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_from_env() is None
