"""``polytask`` command line: fit, evaluate, predict, compare, demo and the catalogues.

Every known failure (bad file, column, task, value, checkpoint) ends in one line on stderr that
names the problem and what to do, and exit status 2.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click
import yaml

__all__ = ["main"]

EXIT_USAGE = 2


def _parse_kv(pairs: tuple[str, ...], what: str) -> dict[str, Any]:
    """``k=v`` pairs; values are read as YAML scalars (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"'{pair}' is not KEY=VALUE", param_hint=what)
        parsed = yaml.safe_load(value)
        out[key.strip().replace("-", "_")] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def _tasks_file(path: str | None) -> tuple[list[str], dict[str, Any]]:
    """A YAML file with ``tasks: [{name, kind, classes?}]`` and optional table options."""
    if path is None:
        return [], {}
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"tasks file {path} does not exist", param_hint="--tasks-file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise click.BadParameter(f"tasks file {path} is not valid YAML{where}", param_hint="--tasks-file") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tasks"), list):
        raise click.BadParameter(f"tasks file {path} needs a 'tasks:' list", param_hint="--tasks-file")
    specs = []
    for i, t in enumerate(doc["tasks"]):
        if isinstance(t, str):
            specs.append(t)
        elif isinstance(t, dict) and "name" in t:
            kind = t.get("kind", "")
            n = t.get("n_classes")
            specs.append(f"{t['name']}:{kind}({n})" if n else f"{t['name']}:{kind}" if kind else str(t["name"]))
        else:
            raise click.BadParameter(f"tasks file {path}: entry {i + 1} needs a 'name'", param_hint="--tasks-file")
    options = {k: doc[k] for k in ("numeric", "categorical", "drop", "task_column") if k in doc}
    return specs, options


class _Group(click.Group):
    """Turns the package's known errors into one line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        from polytask.boost import MissingLightGBM
        from polytask.train import CheckpointError, NonFiniteLossError

        known = (ValueError, KeyError, FileNotFoundError, FileExistsError, CheckpointError, NonFiniteLossError)
        try:
            return super().invoke(ctx)
        except (*known, MissingLightGBM) as e:
            msg = e.args[0] if e.args else str(e)
            click.echo(f"error: {msg}", err=True)
            sys.exit(EXIT_USAGE)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="polytask")
def cli() -> None:
    """polytask: multi-task learning, reported against single-task baselines."""


_DEVICE_HELP = "Where to train: auto (the GPU when torch sees one), cpu, cuda, cuda:N or mps."


def _device_option(help_text: str = _DEVICE_HELP) -> Any:
    return click.option("--device", default="auto", show_default=True, help=help_text)


def _train_options(f: Any) -> Any:
    options = [
        click.option("--epochs", default=20, show_default=True, help="Maximum number of epochs."),
        click.option("--batch-size", default=256, show_default=True, help="Mini-batch size."),
        click.option("--lr", default=1e-3, show_default=True, help="AdamW learning rate."),
        click.option("--weight-decay", default=1e-4, show_default=True, help="AdamW weight decay."),
        click.option(
            "--schedule",
            type=click.Choice(["constant", "cosine", "linear", "step"]),
            default="constant",
            show_default=True,
            help="Learning-rate schedule over all steps (after warm-up).",
        ),
        click.option("--warmup-steps", default=0, show_default=True, help="Linear warm-up steps."),
        click.option("--grad-clip", type=float, default=None, help="Clip the global gradient norm to this value."),
        click.option(
            "--patience",
            type=int,
            default=5,
            show_default=True,
            help="Stop after this many epochs without validation gain.",
        ),
        click.option("--seed", default=0, show_default=True, help="Seed of initialisation, batches and dropout."),
        click.option("--split-seed", default=0, show_default=True, help="Seed of the train/val/test split."),
        click.option("--max-steps-per-epoch", type=int, default=None, help="Cap steps per epoch (quick runs)."),
        _device_option(),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _data_options(f: Any) -> Any:
    options = [
        click.option(
            "--task",
            "tasks",
            multiple=True,
            help="Target as NAME:KIND (binary | multiclass | multiclass(N) | multilabel | regression); repeat. "
            "For built-in data sets, selects tasks by name.",
        ),
        click.option(
            "--tasks-file", type=click.Path(dir_okay=False), help="YAML file with 'tasks:' and table options."
        ),
        click.option("--val", "val_file", type=click.Path(dir_okay=False), help="Validation table (else split off)."),
        click.option("--test", "test_file", type=click.Path(dir_okay=False), help="Test table (else split off)."),
        click.option("--val-fraction", type=float, default=None, help="Share of rows for validation (default 0.1)."),
        click.option("--test-fraction", type=float, default=None, help="Share of rows for test (default 0.1)."),
        click.option("--numeric", multiple=True, help="Force a column to be numeric; repeat."),
        click.option("--categorical", multiple=True, help="Force a column to be categorical; repeat."),
        click.option("--drop", multiple=True, help="Column to ignore; repeat."),
        click.option("--task-column", default=None, help="Task-column layout: column naming each row's task."),
        click.option("--data-param", multiple=True, help="Built-in data set option KEY=VALUE (e.g. n_train=10000)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _collect_data(data: str, kw: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    from polytask.data import DATASETS

    specs, options = _tasks_file(kw.pop("tasks_file"))
    specs = list(kw.pop("tasks")) + specs
    table_opts = {
        "val": kw.pop("val_file"),
        "test": kw.pop("test_file"),
        "val_fraction": kw.pop("val_fraction"),
        "test_fraction": kw.pop("test_fraction"),
        "numeric": list(kw.pop("numeric")) or None,
        "categorical": list(kw.pop("categorical")) or None,
        "drop": list(kw.pop("drop")) or None,
        "task_column": kw.pop("task_column"),
    }
    data_params = _parse_kv(kw.pop("data_param"), "--data-param")
    if data in DATASETS:
        given = [k for k, v in table_opts.items() if v]
        if given:
            raise click.BadParameter(f"{', '.join(given)} apply to table files, not to the built-in data set '{data}'")
        return specs, data_params
    options.update({k: v for k, v in table_opts.items() if v is not None})
    if data_params:
        raise click.BadParameter("--data-param applies to built-in data sets only")
    return specs, options


def _config(kw: dict[str, Any]) -> Any:
    from polytask.train import TrainConfig

    return TrainConfig(
        epochs=kw.pop("epochs"),
        batch_size=kw.pop("batch_size"),
        lr=kw.pop("lr"),
        weight_decay=kw.pop("weight_decay"),
        schedule=kw.pop("schedule"),
        warmup_steps=kw.pop("warmup_steps"),
        grad_clip=kw.pop("grad_clip"),
        patience=kw.pop("patience"),
        seed=kw.pop("seed"),
        max_steps_per_epoch=kw.pop("max_steps_per_epoch"),
    )


def _print_diagnostics(diag: dict[str, Any]) -> None:
    """Expert usage per task, gate entropy and dead-unit shares, for mixture-of-experts models."""
    usage = diag.get("expert_usage", {})
    entropy = diag.get("gate_entropy", {})
    for task, shares in usage.items():
        bars = " ".join(f"{s:.2f}" for s in shares)
        ent = f"  gate entropy {entropy[task]:.3f} nats" if task in entropy else ""
        click.echo(f"  {task:<20} expert usage [{bars}]{ent}")
    for group, shares in diag.get("expert_zero_share", {}).items():
        click.echo(f"  {group:<20} share of zero outputs per expert [" + " ".join(f"{s:.2f}" for s in shares) + "]")


def _print_metrics(title: str, metrics: dict[str, dict[str, float]]) -> None:
    click.echo(title)
    for task, ms in metrics.items():
        click.echo(f"  {task:<20} " + "  ".join(f"{k}={v:.4f}" for k, v in ms.items()))


def _distributed_rank() -> int:
    """This process's rank under torchrun (0 in a plain run)."""
    from polytask.train._distributed import current

    ctx = current()
    return 0 if ctx is None else ctx.rank


@cli.command()
@click.argument("data")
@_data_options
@click.option(
    "--model",
    default="shared-bottom",
    show_default=True,
    help="Architecture (`polytask models`) or boosting model (`polytask boosters`).",
)
@click.option("--model-param", multiple=True, help="Architecture hyper-parameter KEY=VALUE; repeat.")
@click.option("--balancer", default="equal", show_default=True, help="Balancer (see `polytask balancers`).")
@click.option("--balancer-param", multiple=True, help="Balancer hyper-parameter KEY=VALUE; repeat.")
@_train_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
def fit(data: str, **kw: Any) -> None:
    """Train a multi-task model on DATA (a CSV/Parquet file or a built-in data set name)."""
    from polytask.train import fit as fit_run

    specs, options = _collect_data(data, kw)
    split_seed = kw.pop("split_seed")
    quiet = kw.pop("quiet")
    config = _config(kw)
    res = fit_run(
        data,
        specs or None,
        model=kw["model"],
        model_params=_parse_kv(kw["model_param"], "--model-param"),
        balancer=kw["balancer"],
        balancer_params=_parse_kv(kw["balancer_param"], "--balancer-param"),
        config=config,
        output=kw["output"],
        resume=kw["resume"],
        progress=not quiet,
        data_options=options,
        data_seed=split_seed,
        device=kw["device"],
    )
    if _distributed_rank() > 0:
        return  # under torchrun, rank 0 reports
    click.echo(f"best epoch: {res.best_epoch}; {res.seconds_per_epoch:.2f} s/epoch; run written to {kw['output']}")
    _print_metrics("validation:", res.val)
    if res.test is not None:
        _print_metrics("test:", res.test)


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.argument("data", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_device_option("Where the model runs: auto, cpu, cuda, cuda:N or mps.")
def evaluate(run_dir: str, data: str | None, as_json: bool, device: str) -> None:
    """Metrics of a run's best model on its own val/test splits, or on DATA."""
    from polytask.train import evaluate as evaluate_run

    out, diag = evaluate_run(run_dir, data, diagnostics=True, device=device)
    if as_json:
        click.echo(json.dumps({"metrics": out, "diagnostics": diag}, indent=1))
        return
    for split, metrics in out.items():
        _print_metrics(f"{split}:", metrics)
        _print_diagnostics(diag.get(split, {}))


@cli.command()
@click.argument("run_dir", type=click.Path())
@click.argument("data")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="CSV file to write.")
@_device_option("Where the model runs: auto, cpu, cuda, cuda:N or mps.")
def predict(run_dir: str, data: str, output: str, device: str) -> None:
    """Per-task predictions of a run's best model for every row of DATA, written as CSV."""
    from polytask.train import predict as predict_run
    from polytask.train._checkpoint import atomic_write_text

    df = predict_run(run_dir, data, device=device)
    atomic_write_text(output, df.to_csv(index=False))
    click.echo(f"{len(df)} rows x {len(df.columns)} columns written to {output}")


@cli.command()
@click.argument("data")
@_data_options
@click.option("--models", default="single,shared-bottom,mmoe", show_default=True, help="Comma-separated architectures.")
@click.option("--balancer", default="equal", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Comma-separated training seeds.")
@_train_options
@click.option("--output", "-o", type=click.Path(file_okay=False), default=None, help="Folder for runs and summary.")
def compare(data: str, **kw: Any) -> None:
    """Train several architectures on DATA and report them against the single-task baseline."""
    from polytask.bench.compare import compare as compare_runs

    specs, options = _collect_data(data, kw)
    split_seed = kw.pop("split_seed")
    quiet = kw.pop("quiet")
    config = _config(kw)
    res = compare_runs(
        data,
        specs or None,
        models=[m.strip() for m in kw["models"].split(",") if m.strip()],
        balancer=kw["balancer"],
        config=config,
        seeds=[int(s) for s in kw["seeds"].split(",")],
        output=kw["output"],
        progress=not quiet,
        data_options=options,
        echo=click.echo,
        data_seed=split_seed,
        device=kw["device"],
    )
    click.echo(res.table())


@cli.command()
@click.option("--output", "-o", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--n-train", default=20000, show_default=True, help="Multi-MNIST training images used.")
@click.option("--epochs", default=5, show_default=True)
@click.option("--quiet", is_flag=True)
def demo(output: str, n_train: int, epochs: int, quiet: bool) -> None:
    """Multi-MNIST: single-task vs shared-bottom vs MMoE, with per-task accuracy and Δm."""
    import shutil

    from polytask.bench.compare import compare as compare_runs
    from polytask.data import load_dataset
    from polytask.train import TrainConfig

    t0 = time.perf_counter()
    out = Path(output)
    if out.exists():
        shutil.rmtree(out)
    bundle = load_dataset("multi-mnist", n_train=n_train, n_val=2000, n_test=10000)
    bundle.meta["source"] = {
        "source": "multi-mnist",
        "builtin": True,
        "tasks": [],
        "options": {"n_train": n_train, "n_val": 2000, "n_test": 10000},
        "seed": 0,
    }
    click.echo(f"Multi-MNIST: {len(bundle.train)} train / {len(bundle.val)} val / {len(bundle.test)} test images")
    # Settings chosen on validation in benchmarks/multimnist.py (docs/benchmarks/multimnist.md).
    cfg = TrainConfig(epochs=epochs, batch_size=256, lr=1e-2, schedule="cosine", patience=None)
    res = compare_runs(
        bundle,
        models=["single", "shared-bottom", "mmoe"],
        model_params={"mmoe": {"n_experts": 3}},
        config=cfg,
        output=out,
        progress=not quiet,
        echo=click.echo,
    )
    acc = {t: ["accuracy"] for t in res.tasks}
    click.echo("\nTest accuracy per task (Δm% < 0 and Δp > 0 mean multi-task learning helped):\n")
    click.echo(res.table(metrics=acc))
    click.echo(f"\nruns, checkpoints and summary written to {out}/ in {time.perf_counter() - t0:.0f} s")


@cli.command()
def models() -> None:
    """List every architecture with its paper and hyper-parameters."""
    from polytask.nn import MODELS

    for name, e in sorted(MODELS.items()):
        params = ", ".join(f"{k}={v}" for k, v in e.defaults.items())
        click.echo(f"{name:<15} {e.description}\n{'':<15} paper: {e.paper}\n{'':<15} params: {params}")


@cli.command()
def balancers() -> None:
    """List every balancer with its paper and hyper-parameters."""
    from polytask.balance import BALANCERS

    for name, e in sorted(BALANCERS.items()):
        params = ", ".join(f"{k}={v}" for k, v in e.defaults.items()) or "(none)"
        click.echo(f"{name:<15} {e.description}\n{'':<15} paper: {e.paper}\n{'':<15} params: {params}")


@cli.command()
def datasets() -> None:
    """List the built-in data sets."""
    from polytask.data import DATASETS

    for name, e in sorted(DATASETS.items()):
        click.echo(f"{name:<22} {e.description} ({e.source})")


# --- polytask merge (model merging) ---


@cli.command("merge")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--list", "list_methods", is_flag=True, help="List every merge method with its paper and defaults.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def merge_cmd(config: str | None, overwrite: bool, list_methods: bool, quiet: bool) -> None:
    """Merge fine-tuned models as described by the YAML file CONFIG (see docs in polytask.merge)."""
    from polytask.merge import DATA_DRIVEN, MERGE_METHODS

    if list_methods:
        for name, e in sorted(MERGE_METHODS.items()):
            params = ", ".join(f"{k}={v}" for k, v in e.defaults.items()) or "(none)"
            kind = "data-driven" if name in DATA_DRIVEN else "data-free"
            click.echo(f"{name:<18} [{kind}] {e.description}\n{'':<18} paper: {e.paper}\n{'':<18} params: {params}")
        return
    if config is None:
        raise click.UsageError("give a merge config file (CONFIG.yaml) or --list")
    from polytask.merge import merge

    t0 = time.perf_counter()
    out = merge(config, overwrite=overwrite, progress=False if quiet else None)
    click.echo(f"merged model written to {out} in {time.perf_counter() - t0:.1f} s")


# --- polytask bench / sweep (suites, leaderboard, Optuna) ---


@cli.command("bench")
@click.argument("suite", required=False)
@click.option(
    "--output", "-o", type=click.Path(file_okay=False), default=None, help="BENCH_DIR (default: bench-<suite name>)."
)
@click.option("--workers", default=1, show_default=True, help="Worker processes (0: train in this process).")
@click.option("--threads", type=int, default=None, help="Torch threads per worker (default: cores // workers).")
@click.option("--retry-failed", is_flag=True, help="Run failed runs again (default: keep their stored error).")
@_device_option("Where training runs train: auto (the GPU when torch sees one), cpu, cuda, cuda:N or mps.")
@click.option(
    "--leaderboard",
    "board_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Print the leaderboard of BENCH_DIR from its SQLite file (no training).",
)
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="Also write the leaderboard to FILE.")
@click.option("--quiet", is_flag=True, help="No line per finished run.")
def bench_cmd(
    suite: str | None,
    output: str | None,
    workers: int,
    threads: int | None,
    retry_failed: bool,
    device: str,
    board_dir: str | None,
    markdown: str | None,
    quiet: bool,
) -> None:
    """Run the grid of SUITE (a YAML file or a shipped suite name) into BENCH_DIR, then print its leaderboard.

    Results go to BENCH_DIR/bench.sqlite as runs finish; rerunning the same command skips finished
    runs and resumes half-finished ones. Shipped suites: multimnist, census-group1, merge-multimnist,
    merge-glue-minilm (a ``kind: merge`` suite merges a pool of fine-tuned models; see `polytask pools`).
    """
    from polytask.bench import leaderboard, load_suite, run_bench
    from polytask.train._checkpoint import atomic_write_text

    if board_dir is None:
        if suite is None:
            raise click.UsageError("give a SUITE to run, or --leaderboard BENCH_DIR")
        spec = load_suite(suite)
        board_dir = output or f"bench-{spec.name}"
        try:
            summary = run_bench(spec, board_dir, workers=workers, threads=threads, retry_failed=retry_failed,
                                echo=None if quiet else click.echo, device=device)  # fmt: skip
        except KeyboardInterrupt:
            click.echo(f"interrupted: finished runs are stored in {board_dir}/bench.sqlite; rerun to resume", err=True)
            sys.exit(130)
        click.echo(summary.line())
    elif suite is not None:
        raise click.UsageError("--leaderboard reads a BENCH_DIR; do not give a SUITE with it")
    board = leaderboard(board_dir)
    board.print()
    if markdown:
        atomic_write_text(markdown, board.to_markdown())
        click.echo(f"leaderboard written to {markdown}")


@cli.command("sweep")
@click.argument("data")
@_data_options
@click.option("--model", default="shared-bottom", show_default=True, help="Architecture (see `polytask models`).")
@click.option("--model-param", multiple=True, help="Fixed architecture hyper-parameter KEY=VALUE; repeat.")
@click.option("--balancer", default="equal", show_default=True, help="Balancer (see `polytask balancers`).")
@click.option("--balancer-param", multiple=True, help="Fixed balancer hyper-parameter KEY=VALUE; repeat.")
@click.option("--space", required=True, type=click.Path(dir_okay=False), help="YAML search space file.")
@click.option("--trials", required=True, type=int, help="Total trials of the study (finished ones count).")
@click.option("--storage", default=None, help="Optuna RDB URL (default: sqlite:///OUTPUT/study.db).")
@click.option("--study", default=None, help="Study name (default: DATA-MODEL-BALANCER); the same name resumes.")
@click.option("--sampler-seed", default=0, show_default=True, help="Seed of the TPE sampler.")
@_train_options
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Folder of study and best run.")
def sweep_cmd(data: str, **kw: Any) -> None:
    """Optuna study on the validation score of DATA; the best trial is re-trained and its test metrics shown.

    Many workers on many machines share one study through --storage postgresql://USER@HOST/DB
    (with psycopg[binary] installed) and the same --study name.
    """
    from polytask.bench import sweep

    specs, options = _collect_data(data, kw)
    split_seed = kw.pop("split_seed")
    quiet = kw.pop("quiet")
    config = _config(kw)
    res = sweep(
        data,
        specs or None,
        model=kw["model"],
        balancer=kw["balancer"],
        space=kw["space"],
        trials=kw["trials"],
        output=kw["output"],
        storage=kw["storage"],
        study=kw["study"],
        config=config,
        model_params=_parse_kv(kw["model_param"], "--model-param"),
        balancer_params=_parse_kv(kw["balancer_param"], "--balancer-param"),
        data_options=options,
        data_seed=split_seed,
        seed=kw["sampler_seed"],
        echo=None if quiet else click.echo,
        device=kw["device"],
    )
    click.echo(f"study '{res.study}': {res.n_trials} trial(s), {res.ran} run now; best trial {res.best_trial}")
    shown = {g: p for g, p in res.best_params.items() if p}
    click.echo(f"best settings: {json.dumps(shown)} (val score {res.best_value:.4f})")
    _print_metrics("validation:", res.val)
    if res.test is not None:
        _print_metrics("test:", res.test)
    click.echo(f"best trial re-trained into {res.run_dir}; summary in {Path(kw['output']) / 'sweep.json'}")


@cli.command()
@click.argument("directory", type=click.Path())
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="HTML file [DIRECTORY/report.html]")
def report(directory: str, output: str | None) -> None:
    """One self-contained HTML report (plots inline) for a run directory or a folder of runs."""
    from polytask.evaluate._plots import MissingPlotsDependency
    from polytask.evaluate.report import write_report

    try:
        path = write_report(directory, output)
    except MissingPlotsDependency as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USAGE)
    click.echo(f"report written to {path}")


@cli.command()
def boosters() -> None:
    """List the gradient-boosting models (``polytask fit DATA --model NAME``) with their parameters."""
    from polytask.boost import BOOSTERS

    for name, e in sorted(BOOSTERS.items()):
        params = ", ".join(f"{k}={v}" for k, v in e.defaults.items())
        click.echo(f"{name:<15} {e.description}\n{'':<15} paper: {e.paper}\n{'':<15} params: {params}")


# --- polytask pools (merge suites) ---
@cli.command()
def pools() -> None:
    """List the merging-pool builders of merge suites (``pool: {name: NAME, params: {...}}``)."""
    from polytask.bench import POOLS

    for name, e in sorted(POOLS.items()):
        params = ", ".join(f"{k}={v}" for k, v in e.defaults.items())
        click.echo(f"{name:<17} {e.description}\n{'':<17} paper: {e.paper}\n{'':<17} params: {params}")


def main() -> None:
    cli(prog_name="polytask")


if __name__ == "__main__":
    main()
