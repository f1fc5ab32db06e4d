"""``polytask report``: run discovery, the metric table and gains, the Pareto front, the figures, and
the page in headless Chromium (loads without console errors, every plot present, non-blank)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from polytask.cli import cli
from polytask.data import DataBundle, InputSpec, TaskTensors
from polytask.evaluate import delta_m, delta_p, find_runs, pareto_front, write_report
from polytask.evaluate.report import render_report
from polytask.tasks import Task
from polytask.train import TrainConfig, fit

CHROMIUM = shutil.which("chromium")
#: (model, balancer, seeds)
METHODS = (("single", "equal", (0, 1)), ("shared-bottom", "upgrad", (0, 1)), ("mmoe", "equal", (0,)),
           ("shared-bottom", "dwa", (0,)))  # fmt: skip


def _bundle(n: int = 240) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = {"buy": (x[:, 0] + 0.3 * torch.randn(n, generator=g) > 0).float(), "spend": x[:, 1] * 2 + x[:, 2]}
    tasks = [Task("buy", "binary"), Task("spend", "regression")]

    def split(a: int, b: int) -> TaskTensors:
        return TaskTensors({"num": x[a:b], "cat": torch.zeros(b - a, 0, dtype=torch.long)},
                           {k: v[a:b] for k, v in y.items()},
                           {k: torch.ones(b - a, dtype=torch.bool) for k in y})  # fmt: skip

    return DataBundle("toy", tasks, InputSpec("tabular", n_numeric=4), split(0, 160), split(160, 200), split(200, n))


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    bundle = _bundle()
    for model, balancer, seeds in METHODS:
        for seed in seeds:
            params = {"n_experts": 3} if model == "mmoe" else {}
            fit(bundle, model=model, model_params=params, balancer=balancer, progress=False,
                config=TrainConfig(epochs=3, batch_size=64, lr=1e-2, seed=seed, patience=None),
                output=root / "runs" / f"{model}-{balancer}-s{seed}")  # fmt: skip
    return root


@pytest.fixture(scope="module")
def rendered(runs_dir: Path) -> tuple[str, list[str]]:
    return render_report(runs_dir)


def _results(runs_dir: Path, name: str) -> dict:
    return json.loads((runs_dir / "runs" / name / "results.json").read_text())


def test_finds_every_run_and_groups_by_method(runs_dir: Path) -> None:
    runs = find_runs(runs_dir)
    assert len(runs) == 6
    assert sorted({r.method for r in runs}) == ["mmoe(n_experts=3) / equal", "shared-bottom / dwa",
                                                "shared-bottom / upgrad", "single / equal"]  # fmt: skip
    assert {r.data for r in runs} == {"toy"}
    # A single run directory is a report root too.
    assert [r.seed for r in find_runs(runs_dir / "runs" / "single-equal-s1")] == [1]


def test_gradient_level_runs_log_cosine_and_norms_loss_level_runs_do_not(runs_dir: Path) -> None:
    lines = [json.loads(s) for s in (runs_dir / "runs/shared-bottom-upgrad-s0/metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for rec in lines:
        cos, norm = rec["grad_cosine"], rec["grad_norm"]
        assert cos["buy"]["buy"] == pytest.approx(1.0) and cos["spend"]["spend"] == pytest.approx(1.0)
        assert cos["buy"]["spend"] == cos["spend"]["buy"] and -1.0 <= cos["buy"]["spend"] <= 1.0
        assert norm["buy"] > 0 and norm["spend"] > 0
        assert set(rec["weights"]) == {"buy", "spend"}
    equal = (runs_dir / "runs/shared-bottom-dwa-s0/metrics.jsonl").read_text()
    assert "grad_cosine" not in equal and "grad_norm" not in equal


def _figure_ids(doc: str) -> list[str]:
    return re.findall(r'<img id="([^"]+)-img" class="plot"', doc)


def test_report_table_gains_and_figures(runs_dir: Path, rendered: tuple[str, list[str]]) -> None:
    doc, ids = rendered
    assert ids == _figure_ids(doc)
    assert ids == ["fig-toy-curves", "fig-toy-pareto", "fig-toy-cosine-shared-bottom---upgrad", "fig-toy-weights",
                   "fig-toy-experts"]  # fmt: skip
    # Self-contained: no script, no stylesheet link, no remote URL anywhere.
    assert "<script" not in doc and "<link" not in doc and "http://" not in doc and "https://" not in doc
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', doc):
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    # Δm% / Δp of shared-bottom / upgrad against the single-task mean over its two seeds, from results.json.
    single = [_results(runs_dir, f"single-equal-s{s}")["test"] for s in (0, 1)]
    upgrad = [_results(runs_dir, f"shared-bottom-upgrad-s{s}")["test"] for s in (0, 1)]

    def mean(rs: list[dict]) -> dict:
        return {t: {m: (rs[0][t][m] + rs[1][t][m]) / 2 for m in rs[0][t]} for t in rs[0]}

    row = re.search(r"<tr><td>shared-bottom / upgrad</td>(.*?)</tr>", doc).group(1)
    cells = re.findall(r'<td class="num">([^<]*)</td>', row)
    assert cells[-2] == f"{delta_m(mean(upgrad), mean(single)):+.2f}"
    assert cells[-1] == f"{delta_p(mean(upgrad), mean(single)):+.2f}"
    auc = [r["buy"]["auc"] for r in upgrad]
    assert f"{sum(auc) / 2:.4f} ± " in row
    base = re.search(r'<tr class="base"><td>single / equal</td>(.*?)</tr>', doc).group(1)
    assert re.findall(r'<td class="num">([^<]*)</td>', base)[-2:] == ["+0.00", "+0.00"]


def test_pareto_front_caption_lists_the_non_dominated_methods(runs_dir: Path, rendered: tuple[str, list[str]]) -> None:
    doc, _ = rendered
    points = {}
    for r in find_runs(runs_dir):
        test = r.results["test"]
        points.setdefault(r.method, []).append((test["buy"]["auc"], test["spend"]["r2"]))  # primary metrics
    mean = {m: [sum(v[i] for v in vs) / len(vs) for i in (0, 1)] for m, vs in points.items()}
    front = pareto_front(mean, [True, True])
    assert front and f"scatter; non-dominated: {', '.join(front)}." in doc


def test_pareto_front_reference_values() -> None:
    pts = {"a": (0.9, 0.8), "b": (0.8, 0.9), "c": (0.7, 0.7), "d": (0.9, 0.8), "e": (float("nan"), 1.0)}
    assert pareto_front(pts, [True, True]) == ["a", "b", "d"]  # ties do not dominate each other
    assert pareto_front(pts, [False, False]) == ["c"]
    assert pareto_front(pts, [True, False]) == ["a", "c", "d"]
    assert pareto_front({"x": (1.0, 2.0, 3.0), "y": (1.0, 2.0, 2.0)}, [True] * 3) == ["x"]


def _fake_run(path: Path, balancer: str, values: dict[str, float], tasks: list[Task]) -> None:
    path.mkdir(parents=True)
    spec = [t.to_dict() for t in tasks]
    cfg = {"data_source": {"source": "three"}, "model": {"name": "shared-bottom", "params": {}},
           "balancer": {"name": balancer, "params": {}}, "train_config": {"seed": 0}, "tasks": spec}  # fmt: skip
    (path / "config.json").write_text(json.dumps(cfg))
    test = {t.name: {"rmse": values[t.name], "mae": values[t.name], "r2": 1 - values[t.name] / 10} for t in tasks}
    (path / "results.json").write_text(json.dumps({"tasks": spec, "test": test, "val": test, "best_epoch": 1}))
    hist = {"epoch": 1, "train_loss": values, "weights": {t.name: 1.0 for t in tasks}, "val": test}
    (path / "metrics.jsonl").write_text(json.dumps(hist) + "\n")


def test_three_tasks_get_parallel_coordinates(tmp_path: Path) -> None:
    tasks = [Task(n, "regression") for n in ("a", "b", "c")]
    _fake_run(tmp_path / "r1", "equal", {"a": 1.0, "b": 2.0, "c": 3.0}, tasks)
    _fake_run(tmp_path / "r2", "dwa", {"a": 2.0, "b": 2.0, "c": 3.0}, tasks)  # dominated by r1 (r2 higher)
    _fake_run(tmp_path / "r3", "uncertainty", {"a": 3.0, "b": 1.0, "c": 1.0}, tasks)
    doc, ids = render_report(tmp_path)
    assert "fig-three-pareto" in ids
    assert "parallel coordinates; non-dominated: shared-bottom / equal, shared-bottom / uncertainty." in doc


def test_bad_input_gives_one_line_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: {tmp_path}: no run directories found (a run directory holds config.json, metrics.jsonl, "
        "results.json); pass a `polytask fit` output, a `polytask compare` output or a bench directory"
    ]
    res = runner.invoke(cli, ["report", str(tmp_path / "nope")])
    assert (
        res.exit_code == 2 and res.output.strip() == f"error: {tmp_path / 'nope'} does not exist or is not a directory"
    )
    _fake_run(tmp_path / "bad", "equal", {"a": 1.0}, [Task("a", "regression")])
    (tmp_path / "bad" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": \n')
    res = runner.invoke(cli, ["report", str(tmp_path)])
    assert res.exit_code == 2
    assert res.output.startswith(f"error: {tmp_path / 'bad' / 'metrics.jsonl'} line 2 is not valid JSON")


def test_missing_matplotlib_names_the_extra(runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    res = CliRunner().invoke(cli, ["report", str(runs_dir), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 2
    assert res.output.strip() == (
        "error: the report draws its plots with matplotlib, which is not installed: pip install 'polytask[plots]'"
    )
    assert not (tmp_path / "r.html").exists()


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra, url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_in_headless_chromium(runs_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    # Control: the console detector sees an error the page logs.
    control = tmp_path / "control.html"
    control.write_text('<html><body><script>console.error("polytask-control")</script></body></html>')
    res = _chromium(tmp_path, control.as_uri(), "--dump-dom")
    assert any("polytask-control" in line for line in _console_lines(res.stderr)), res.stderr[-2000:]

    out = write_report(runs_dir, tmp_path / "report.html")
    res = _chromium(tmp_path, out.as_uri(), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _console_lines(res.stderr) == []
    # The DOM Chromium built holds every figure, each with its title.
    dom = res.stdout
    for fid in ("curves", "pareto", "cosine-shared-bottom---upgrad", "weights", "experts"):
        assert re.search(rf'<img id="fig-toy-{fid}-img" class="plot" title="toy: [^"]+"', dom), fid
    assert len(re.findall(r"<img ", dom)) == 5
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, out.as_uri(), f"--screenshot={shot}", "--window-size=1280,4000")
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    img = Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")
    assert img.size == (1280, 4000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # plots, not a blank page
    # Non-white pixels reach well down the page: the figures rendered, not just the header.
    bbox = Image.eval(img.convert("L"), lambda v: 255 - v).getbbox()
    assert bbox is not None and bbox[3] > 1500
