"""`cascade pseudo-label`: grade a file's models by agreement with a reference model,
and `cascade pseudo-label --compare`: tune on those pseudo-labels, score on real grades."""
from __future__ import annotations

import json

import click

from router.core.answers import KINDS
from router.core.comparators import COMPARATORS, make_comparator
from router.lab import pseudo_check
from router.lab.pseudo_labels import UNPARSED_MODES, label_file
from router.lab.risk import PROCEDURES
from router.lab.tuners import RiskSpec
from worker.cli.common import user_errors


def comparator_options(f):
    """--comparator, --kind, --similarity (shared with `cascade calibrate`)."""
    for opt in reversed([
        click.option("--comparator", type=click.Choice(COMPARATORS), default="canonical", show_default=True,
                     help="canonical: letters, numbers, normalised short text; embedding: free text by "
                          "MiniLM cosine similarity"),
        click.option("--kind", type=click.Choice(KINDS), default="auto", show_default=True,
                     help="canonical comparator: the answer kind (auto: the kind most reference answers are)"),
        click.option("--similarity", type=float, default=0.85, show_default=True,
                     help="embedding comparator: cosine similarity at or above which two answers agree"),
        click.option("--unparsed", type=click.Choice(UNPARSED_MODES), default="disagree", show_default=True,
                     help="a candidate answer the comparator cannot read: graded as disagreement (counted), "
                          "or left unlabelled"),
    ]):
        f = opt(f)
    return f


@click.command("pseudo-label")
@click.option("--data", "files", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="labelled or unlabelled traffic in the benchmarks format (repeatable with --compare)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="write the pseudo-labelled file here (benchmarks format; .gz to compress)")
@click.option("--reference", default=None,
              help="the trusted model (default: the most accurate by the file's own grades, on the train split "
                   "if it has one); 'gold': grade against each row's gold answer instead")
@comparator_options
@click.option("--compare", is_flag=True,
              help="tune on the train split's pseudo-labels and on its real grades; score both on the real grades "
                   "of the test split (cross-fitted if the file has one split)")
@click.option("--policy", "policies", multiple=True, default=("threshold",), show_default=True,
              help="with --compare: policies to tune (repeatable)")
@click.option("--risk-bound", type=float, default=0.05, show_default=True,
              help="with --compare: the Learn-then-Test bound for policies with a risk-controlled tuner (0: none)")
@click.option("--delta", type=float, default=0.1, show_default=True, help="with --compare: failure probability")
@click.option("--risk-procedure", type=click.Choice(list(PROCEDURES)), default="fixed-sequence", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="with --compare: last line, one JSON object")
def pseudo_label_cmd(files, out, reference, comparator, kind, similarity, unparsed, compare, policies, risk_bound,
                     delta, risk_procedure, as_json) -> None:
    """Replace every model's `correct` by agreement with the reference model's answer
    (read from the file's own answer texts). Rows where the reference gives no readable
    answer are left unlabelled and counted; unreadable candidate answers are counted."""
    with user_errors():
        comp = make_comparator(comparator, kind=kind, similarity=similarity)
        if compare:
            if out:
                raise click.UsageError("--out writes one pseudo-labelled file; leave it out with --compare")
            risk = RiskSpec(risk_bound, delta, risk_procedure) if risk_bound else None
            results = [pseudo_check.compare(f, comp, policies=policies, risk=risk, reference=reference,
                                            unparsed=unparsed) for f in files]
            click.echo("\n\n".join(pseudo_check.render(r) for r in results))
            if as_json:
                click.echo(json.dumps({"results": results}))
            return
        if len(files) != 1 or not out:
            raise click.UsageError("give one --data file and --out (or --compare)")
        report = label_file(files[0], out, comp, reference=reference, unparsed=unparsed)
    click.echo("\n".join(report.lines()))
    click.echo(f"wrote {out}")
