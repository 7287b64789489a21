"""The demo's report (`cascade demo`): a run's jobs summarised per tier and level, the
table printed and written, the figures of the --json line, and what `--calibrate`
prints about the policy it fitted."""
from __future__ import annotations

from typing import Any

from router.lab import demo_questions as dq
from router.lab.demo_calibration import Calibration


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
           n: int, seed: int, mix: str, wall: dict[str, dict[str, float]], threads: int,
           prices: dict[str, float], where: str = "embedded Celery workers, llama.cpp") -> str:
    lines = []
    lines.append(f"cascade demo: {n} generated questions (seed {seed}, {mix}), {' -> '.join(chain)}; {policy}; "
                 f"{where}, {threads} threads")
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
    price_text = ", ".join(f"{t} {prices[t]:g}" for t in chain)
    lines.append(f"prices are configured, not real: {price_text} USD per 1M tokens (input and output); "
                 f"model time = sum of the attempts' latencies")
    names = {"cascade": "cascade", "top": "always " + chain[-1]}
    lines.append("wall time, models loaded, first submission to last result: "
                 + ", ".join(f"{names[k]} {v['serve']:.1f}s" for k, v in wall.items() if "serve" in v)
                 + "; before it, starting the workers and loading the models: "
                 + ", ".join(f"{names[k]} {v['start']:.1f}s" for k, v in wall.items() if "start" in v))
    return "\n".join(lines)


def render_calibration(cal: Calibration, rows: list[dict], chain: list[str]) -> str:
    """What `cascade demo --calibrate` prints: each tier's accuracy and time on the
    calibration rows, then the policy fitted and what it keeps."""
    lines = []
    for t in chain:
        acc = sum(r[t]["ok"] for r in rows) / len(rows)
        ms = sum(r[t]["ms"] for r in rows) / len(rows)
        lines.append(f"  {t:7} accuracy {100 * acc:5.1f}%  {ms:6.0f} ms/question")
    p = cal.params
    lines.append(f"{cal.policy}: chain {' -> '.join(p['chain'])}, "
                 + describe_policy(p["chain"], cal.signal, p["thresholds"], p.get("router"))
                 + f"; on the calibration set the cascade keeps {100 * cal.accuracy:.1f}% accuracy "
                   f"(always {chain[-1]}: {100 * cal.baseline_accuracy:.1f}%) in "
                   f"{100 * cal.time_ratio:.0f}% of the model time; answered: {cal.accepted}"
                 + ("" if cal.out_of_fold is None else
                    f"; with out-of-fold router predictions (what the knobs were chosen on): "
                    f"{100 * cal.out_of_fold[0]:.1f}% accuracy in {100 * cal.out_of_fold[1]:.0f}% of the model time"))
    return "\n".join(lines)
