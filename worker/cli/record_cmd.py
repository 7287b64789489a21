"""`cascade record`: the local benchmark file, every local model on a shared question set.

    cascade record --out data/local-bench/local-bench.jsonl [--plan mmlu.test=60,...] [--limit N]

The recording is worker.labwork.record's (what each line holds, how a re-run
resumes); this module reads the options and prints.
"""
from __future__ import annotations

from pathlib import Path

import click

from worker.cli.common import user_errors
from worker.labwork.record import record as record_questions


def _log(message: str) -> None:
    click.echo(message, err=True)


@click.command("record")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the JSONL file to write (appended to; ids already in it are skipped)")
@click.option("--plan", default=None, help="questions per shared set, e.g. mmlu.test=60,gsm8k.test=40 "
                                           "(default: router.lab.local_bench.DEFAULT_PLAN)")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the draw")
@click.option("--chain", default="tiny,small,medium", show_default=True, help="local models, cheapest first")
@click.option("--threads", default=1, show_default=True, type=int,
              help="llama.cpp threads per model (1: on a busy machine more threads spin-wait on each other)")
@click.option("--signals-on", default=None,
              help="models whose extra calls are recorded (default: all but the last of the chain: a cascade "
                   "always accepts its last tier's answer, so no policy reads its live signals)")
@click.option("--shard", default="0/1", show_default=True,
              help="i/n: record only the questions whose position in the draw is i modulo n (parallel runs, "
                   "each with its own --out; concatenate them afterwards)")
@click.option("--reverse", is_flag=True,
              help="take the shard's questions from its end (a second run on the same shard, with its own --out, "
                   "meets the first in the middle; concatenate, keeping the first line of an id)")
@click.option("--limit", type=int, default=None, help="stop after this many new questions (a pilot)")
def record(out_path: Path, plan, seed, chain, threads, signals_on, shard, reverse, limit) -> None:
    """Record every local model's answers, token log-probs and extra-call signals on a shared question set."""
    try:
        i_shard, n_shard = (int(x) for x in shard.split("/"))
        assert 0 <= i_shard < n_shard
    except (ValueError, AssertionError):
        raise click.BadParameter(f"{shard!r} is not i/n with 0 <= i < n", param_hint="--shard") from None
    names = [c.strip() for c in chain.split(",") if c.strip()]
    signals = None if signals_on is None else [s.strip() for s in signals_on.split(",")]
    with user_errors():
        n, seconds = record_questions(out_path, plan, seed, names, threads, signals, (i_shard, n_shard), reverse,
                                      limit, log=_log)
    click.echo(f"wrote {n} questions to {out_path} in {seconds:.0f}s")
