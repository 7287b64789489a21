"""The `cascade` command. Each subcommand lives in its own module and is imported
only when used, so `cascade evaluate` never imports Celery and `cascade run`
never imports llama.cpp."""
from __future__ import annotations

import importlib
import sys
import traceback

import click
from pydantic import ValidationError

from router.core.errors import UserError
from worker.config.credentials import redact_text
from worker.config.logs import configure_logging
from worker.config.settings import get_settings

_COMMANDS = {
    "run": ("worker.cli.run_cmd:run", "run a JSONL batch through the tiers and write the results"),
    "worker": ("worker.cli.worker_cmd:worker", "start the worker pool of one tier (distributed mode)"),
    "flower": ("worker.cli.flower_cmd:flower", "Flower on the configured broker, behind basic auth"),
    "check": ("worker.cli.check_cmd:check", "probe each tier's backend: does it return every signal the policy reads?"),
    "serve": ("worker.cli.serve_cmd:serve", "the HTTP task API: jobs, batches, OpenAI-compatible chat completions"),
    "keys": ("worker.cli.keys_cmd:keys", "API keys of the task API's tenants, and their budgets and rate limits"),
    "status": ("worker.cli.status_cmd:status", "show a batch's progress, per-tier counts and cost"),
    "cancel": ("worker.cli.cancel_cmd:cancel", "cancel a batch's unfinished jobs"),
    "resume": ("worker.cli.resume_cmd:resume", "send again the current stage of a batch's unfinished jobs"),
    "purge": ("worker.cli.purge_cmd:purge", "delete finished batches and jobs older than an age (retention)"),
    "retry": ("worker.cli.retry_cmd:retry", "queue again a batch's dead letters and expired jobs"),
    "db": ("worker.cli.db_cmd:db", "database migrations"),
    "bench": ("worker.cli.bench_cmd:bench", "benchmarks, reported as ratios against a baseline in the same run"),
    "demo": ("worker.cli.demo_cmd:demo", "real local models tiny -> small -> medium on a generated question set"),
    "models": ("worker.cli.models_cmd:models", "prepare and list the local model pack"),
    "evaluate": ("worker.cli.evaluate_cmd:evaluate", "offline cost/quality evaluation of policies on labelled data"),
    "tune": ("worker.cli.tune_cmd:tune", "fit a policy's knobs on the train split and write a policy file"),
    "pseudo-label": ("worker.cli.pseudo_cmd:pseudo_label_cmd",
                     "grade models by agreement with a reference model's answers (no labels needed)"),
    "calibrate": ("worker.cli.calibrate_cmd:calibrate",
                  "run a traffic sample through every tier; write it labelled by agreement with the top tier"),
    "record": ("worker.cli.record_cmd:record",
               "every local model on a shared question set, with live signals: the local benchmark file"),
    "feedback": ("worker.cli.feedback_cmd:feedback", "record graded outcomes of jobs; export them for re-tuning"),
    "retune": ("worker.cli.retune_cmd:retune_cmd",
               "refit the live policy on graded and top-tier-labelled live jobs; store a candidate version"),
    "policy": ("worker.cli.policy_cmd:policy", "a portfolio's policy versions: list, add, shadow, promote, rollback"),
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
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto", show_default=True,
              help="log lines: readable on a terminal, JSON otherwise (auto), or as given")
def cli(log_format: str) -> None:
    """Cascade Router: answer each LLM request with the cheapest model confident enough."""
    configure_logging(None if log_format == "auto" else log_format == "json", level="WARNING",
                      content=_log_content())


def _log_content() -> bool:
    try:
        return get_settings().log_content
    except ValidationError:  # a bad CASCADE_ setting: the subcommand that reads it names it
        return False


def main() -> None:
    """Run the command. A user's mistake (a `UserError` that a subcommand did not
    already turn into a message) is one line and exit 2; anything else is a bug,
    reported as one with its traceback and exit 70 (EX_SOFTWARE)."""
    try:
        code = cli(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.ClickException as e:
        e.message = redact_text(e.message)
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {redact_text(str(e))}", err=True)
        sys.exit(2)
    except Exception:
        click.echo(redact_text(traceback.format_exc()), err=True, nl=False)
        click.echo("internal error: this is a bug in Cascade Router, not a problem with your input; "
                   "please report it with the traceback above", err=True)
        sys.exit(70)
    if isinstance(code, int) and code:
        sys.exit(code)
