"""The `cascade` command. Each subcommand lives in its own module and is imported
only when used, so `cascade evaluate` never imports Celery and `cascade run`
never imports llama.cpp."""
from __future__ import annotations

import importlib
import sys

import click

_COMMANDS = {
    "run": ("worker.cli.run_cmd:run", "run a JSONL batch through the tiers and write the results"),
    "worker": ("worker.cli.worker_cmd:worker", "start the worker pool of one tier (distributed mode)"),
    "status": ("worker.cli.status_cmd:status", "show a batch's progress, per-tier counts and cost"),
    "cancel": ("worker.cli.cancel_cmd:cancel", "cancel a batch's unfinished jobs"),
    "resume": ("worker.cli.resume_cmd:resume", "send again the current stage of a batch's unfinished jobs"),
    "db": ("worker.cli.db_cmd:db", "database migrations"),
    "bench": ("worker.cli.bench_cmd:bench", "benchmarks, reported as ratios against a baseline in the same run"),
    "demo": ("worker.cli.demo_cmd:demo", "real local models tiny -> small -> medium on a generated question set"),
    "models": ("worker.cli.models_cmd:models", "prepare and list the local model pack"),
    "evaluate": ("worker.cli.evaluate_cmd:evaluate", "offline cost/quality evaluation of policies on labelled data"),
    "tune": ("worker.cli.tune_cmd:tune", "fit a policy's knobs on the train split and write a policy file"),
}


class _Lazy(click.Group):
    def list_commands(self, ctx):
        return list(_COMMANDS)

    def get_command(self, ctx, name):
        entry = _COMMANDS.get(name)
        if entry is None:
            return None
        mod, _, attr = entry[0].partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except ModuleNotFoundError as e:
            if e.name == mod:
                return click.Command(name, help=entry[1] + " (not available in this build)",
                                     callback=lambda: _fail(f"`cascade {name}` is not available in this build"))
            raise

    def format_commands(self, ctx, formatter):
        formatter.write_dl([(n, h) for n, (_, h) in _COMMANDS.items()], col_max=12)


def _fail(msg: str) -> None:
    raise click.ClickException(msg)


@click.group(cls=_Lazy)
def cli() -> None:
    """Cascade Router: answer each LLM request with the cheapest model confident enough."""


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
