"""`cascade status [BATCH]`: a batch's progress, per-tier counts and cost, and the
decisions each tier took without a signal its policy reads (a warning above 1%)."""
from __future__ import annotations

import json

import click

from router.core.errors import UserError
from router.core.policyfile import read_policy_file
from router.lab import drift
from worker.config.settings import get_settings
from worker.ops.migrate import current
from worker.service.views import signal_gap_view
from worker.store.batches import BatchStore, finished
from worker.store.policies import PolicyStore


@click.command()
@click.argument("batch_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.option("--drift", "policy_file", type=click.Path(dir_okay=False),
              help="the tuned policy file the portfolio runs: warn when a tier's accept rate or confidences "
                   "moved away from its tuning rows beyond what sampling explains")
@click.option("--drift-level", type=click.FloatRange(1e-6, 0.5), default=0.01, show_default=True,
              help="family-wise false-warning rate of the drift tests (Holm)")
def status(batch_id, as_json, policy_file, drift_level) -> None:
    """Show BATCH (or list the recent batches)."""

    settings = get_settings()
    if current(settings.db_url) is None:
        raise click.ClickException("the database has no schema yet: nothing has run (or run `cascade db upgrade`)")
    store = BatchStore(settings.db_url)
    if batch_id is None:
        rows = store.recent_batches(20)
        for b in rows:
            click.echo(f"{b['id']}  {b['done']}/{b['total']} done  {b['failed']} failed  ${b['total_cost']:.6g}  {b['created_at']:%Y-%m-%d %H:%M}")
        if not rows:
            click.echo("no batches yet")
        if rows:
            _gap_lines(store.signal_gaps([b["id"] for b in rows]), "the batches above")
        return
    b = store.batch(batch_id)
    if b is None:
        raise click.ClickException(f"no batch {batch_id!r} (list them with `cascade status`)")
    tiers: dict[str, dict] = {}
    for r in store.batch_tiers(batch_id):
        t = tiers.setdefault(r["tier"], {"tier": r["tier"], "index": r["tier_index"], "calls": 0, "accept": 0,
                                          "escalate": 0, "reject": 0, "cost_usd": 0.0, "model_ms": 0.0})
        t["calls"] += r["n"]
        t[r["decision"]] += r["n"]
        t["cost_usd"] += r["cost"] or 0.0
        t["model_ms"] += r["latency_ms"] or 0.0
    per_tier = sorted(tiers.values(), key=lambda t: t["index"])
    versions = per_version(PolicyStore(settings.db_url).decisions_by_version(batch_id))
    checked = _drift(store, batch_id, policy_file, drift_level) if policy_file else None
    gaps, warnings = signal_gap_view(store.signal_gaps(batch_id))
    for t in per_tier:
        g = gaps.get(t["tier"], {"without_signal": 0, "share": 0.0})
        t["without_signal"], t["without_signal_share"] = g["without_signal"], g["share"]
    if as_json:
        out = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in b.items()}
        out["tiers"] = per_tier
        out["warnings"] = warnings
        out["policy_versions"] = versions
        if checked is not None:
            out["drift"] = checked
        click.echo(json.dumps(out))
        return
    state = "finished" if finished(b) else "submitting" if b["submitting"] else "in progress"
    click.echo(f"batch {b['id']} ({state}): {b['done']}/{b['total']} done, {b['succeeded']} succeeded, "
               f"{b['failed']} failed, {b['cancelled']} cancelled, cost ${b['total_cost']:.6g}")
    click.echo(f"{'tier':<16}{'calls':>8}{'accept':>8}{'escalate':>10}{'reject':>8}{'cost $':>12}{'model s':>10}"
               f"{'no signal':>16}")
    for t in per_tier:
        click.echo(f"{t['tier']:<16}{t['calls']:>8}{t['accept']:>8}{t['escalate']:>10}{t['reject']:>8}"
                   f"{t['cost_usd']:>12.6g}{t['model_ms'] / 1000:>10.1f}"
                   f"{t['without_signal']:>8} ({t['without_signal_share']:.1%})")
    for w in warnings:
        click.echo(f"WARNING {w}")
    if len(versions) > 1 or any(v["version"] not in (None, 1) for v in versions):
        for v in versions:
            click.echo(f"policy version {v['version'] or '1 (unrecorded)'}: {v['attempts']} decisions "
                       f"({v['accept']} accept, {v['escalate']} escalate, {v['reject']} reject)")
    if checked is not None:
        for line in drift_lines(checked):
            click.echo(line)


def _gap_lines(gaps: dict, scope: str) -> None:
    """Decisions taken without a signal the policy reads, per tier (a warning above 1%)."""
    view, warnings = signal_gap_view(gaps)
    if not view:
        return
    click.echo(f"decisions taken without their signal ({scope}): "
               + ", ".join(f"{t} {g['without_signal']}/{g['decisions']} ({g['share']:.1%})" for t, g in view.items()))
    for w in warnings:
        click.echo(f"WARNING {w}")


def per_version(rows: list[dict]) -> list[dict]:
    """Decisions per policy version (the version that decided each attempt)."""
    out: dict = {}
    for r in rows:
        v = out.setdefault(r["version"], {"version": r["version"], "attempts": 0, "accept": 0, "escalate": 0,
                                          "reject": 0})
        v["attempts"] += r["n"]
        v[r["decision"]] = v.get(r["decision"], 0) + r["n"]
    return sorted(out.values(), key=lambda v: (v["version"] is not None, v["version"] or 0))


def _drift(store: BatchStore, batch_id: str, policy_file: str, level: float) -> dict:
    try:
        tuned = read_policy_file(policy_file)
    except UserError as e:
        raise click.ClickException(str(e)) from None
    ref = tuned.fitted.get("reference")
    if not ref:
        raise click.ClickException(f"{policy_file}: no reference distributions recorded (tuned by an older "
                                   f"`cascade tune`): tune again to check drift")
    prod = drift.production(store.tier_observations(batch_id), ref.get("signal"))
    findings, notes = drift.compare(ref, prod, level=level)
    return {"level": level, "tests": [vars(f) for f in findings], "notes": notes,
            "drifted": any(f.drift for f in findings)}


def drift_lines(checked: dict) -> list[str]:
    out = []
    for f in checked["tests"]:
        if f["drift"]:
            out.append(f"WARNING drift: tier {f['tier']} {f['test']}: {f['detail']} (p = {f['p_value']:.2g}); "
                       f"the tuned knobs and any risk guarantee assumed traffic like the tuning rows")
    if checked["drifted"]:
        out.append("drift: re-tune on live traffic with `cascade retune --portfolio PORTFOLIO` (grades from "
                   "`cascade feedback`, else agreement with the top tier; `--audit-share` sends a share of jobs "
                   "through every tier), compare with `cascade policy shadow VERSION`, then `cascade policy "
                   "promote VERSION`")
    if not checked["drifted"]:
        out.append(f"drift: no tier moved beyond what sampling explains ({len(checked['tests'])} tests, "
                   f"Holm at {checked['level']:g})")
    out += [f"drift: {n}" for n in checked["notes"]]
    return out
