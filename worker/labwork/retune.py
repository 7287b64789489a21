"""The closed loop's offline half (`cascade retune`, `cascade policy shadow`): live jobs
become labelled rows, the lab refits the live policy's family on them, and a candidate
version is stored; a shadow replay compares it with the promoted version on the same
recorded jobs.

Labels, per tier answer of a finished job: a grade (`cascade feedback`: `correct` for
the final tier, `tiers` for the others) where there is one; else agreement with a
graded final answer (its grade shared; disagreeing with a right answer is wrong, with
a wrong one unknown); else agreement with the top tier's answer on the same job (the
calibration's pseudo-labels), the top tier's own grade carried over when it was graded. Only jobs where every tier answered can be
fitted on (a cascade's knobs need to know what each tier would have said): live jobs
that reached the top, and the audit's jobs: a share of the recent jobs that stopped
early, sent again through every tier by the calibration path under a spend cap
(`--audit-share`, `--audit-max-usd`; settings CASCADE_RETUNE_AUDIT_SHARE and
CASCADE_RETUNE_AUDIT_MAX_USD). Live jobs that reached the top are the harder ones:
with no audit the fit sees a harder mix than the traffic, which the report says.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from router.core import cascade
from router.core import signals as sig
from router.core.comparators import Comparator, resolved
from router.core.errors import UserError
from router.core.policies import make_policy
from router.core.policy import Policy, tier_infos
from router.core.portfolio import Portfolio, parse_portfolio
from router.lab.tune import tune
from router.lab.tuning import Target
from worker.config.settings import Settings
from worker.job.codec import attempt_from_row, query_of
from worker.labwork.calibration import calibration_portfolio, estimate_tier, response_of
from worker.models.backends import build_backend
from worker.ops.migrate import current
from worker.queue.batch import BatchError
from worker.queue.items import Item
from worker.queue.run import run_batch
from worker.queue.stage import call_backend
from worker.store.batches import BatchStore
from worker.store.policies import PolicyStore

POLICY_REVISION = "0009"
MIN_ROWS = 20  # fewer rows than this fit nothing worth promoting
AUDIT_SLICES = 5  # the audit's batch goes in this many slices, the spend checked before each
HOLDOUT = 0.3  # share of the labelled jobs kept out of the fit, for the shadow comparison


def held_out(job_id: str, share: float, seed: int) -> bool:
    """Whether a job is kept out of the fit (a hash of its id: the same rule in shadow)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{job_id}".encode()).digest()[:8], "big") / 2**64
    return h < share


class RetuneError(UserError):
    """A retune or shadow comparison that cannot run as asked."""


def policy_store(settings: Settings) -> PolicyStore:
    """The store of policy versions, once the database has their table; else an error naming the fix."""
    rev = current(settings.db_url)
    if rev is None:
        raise RetuneError("the database has no schema yet: nothing has run (or run `cascade db upgrade`)")
    if rev < POLICY_REVISION:
        raise RetuneError(f"the database schema is at revision {rev}, policy versions need {POLICY_REVISION}: "
                          f"run `cascade db upgrade`")
    return PolicyStore(settings.db_url)


def file_policy(portfolio: Portfolio) -> dict[str, Any]:
    return {"name": portfolio.policy.name, "params": dict(portfolio.policy.params)}


def version_policy(store: PolicyStore, portfolio: Portfolio, version: int) -> dict[str, Any]:
    """The policy JSON of `version` (1: the portfolio file's); an error naming the known ones."""
    row = store.version(portfolio.digest, version)
    if row is not None:
        return row["policy"]
    if version == 1:
        return file_policy(portfolio)
    known = [r["version"] for r in store.versions(portfolio.digest)] or [1]
    raise RetuneError(f"no policy version {version} for this portfolio; versions: "
                      f"{', '.join(map(str, known))} (see `cascade policy list`)")


def build_policy(portfolio: Portfolio, spec: dict[str, Any]) -> Policy:
    return make_policy(spec["name"], tier_infos(portfolio.tiers), dict(spec.get("params") or {}))


def with_policy(portfolio: Portfolio, spec: dict[str, Any]) -> Portfolio:
    """The portfolio's tiers under another policy (what `cascade check` probes before a promotion)."""
    raw = portfolio.spec()
    raw["policy"] = {"name": spec["name"], "params": dict(spec.get("params") or {})}
    return parse_portfolio(raw, where="policy version")


def answered(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {a["tier"]: a for a in job["attempts"] if a["error"] is None and a["answer"] is not None}


@dataclass
class Labelled:
    job: dict[str, Any]
    labels: dict[str, float]  # tier -> correctness of its answer
    graded: int  # how many of them came from a grade


def label_jobs(jobs: Sequence[dict[str, Any]], tiers: Sequence[str], comparator: Comparator) -> list[Labelled]:
    """Each job's tier answers labelled: grades first, then agreement with the top tier's answer."""
    top = tiers[-1]
    comp = resolved(comparator, [answered(j).get(top, {}).get("answer") for j in jobs])
    out = []
    for j in jobs:
        ans = answered(j)
        labels: dict[str, float] = {}
        fb = j.get("feedback")
        if fb:
            if j["final_tier"] in ans:
                labels[j["final_tier"]] = float(fb["correct"])
            for t, v in (fb.get("tiers") or {}).items():
                if t in ans and v is not None:
                    labels[t] = float(v)
        graded = len(labels)
        final = j["final_tier"]
        if final in labels and final != top:
            # the graded final answer is a reference too: agreeing with it shares its grade,
            # disagreeing with a right answer is wrong (with a wrong one, unknown)
            ref = comp.canonical([ans[final]["answer"]])[0]
            for t, a in ans.items():
                if t in labels or ref is None:
                    continue
                form = comp.canonical([a["answer"]])[0]
                if form is not None and comp.same(form, ref):
                    labels[t] = labels[final]
                elif labels[final] == 1.0:
                    labels[t] = 0.0
        if top in ans:
            ref = comp.canonical([ans[top]["answer"]])[0]
            top_label = labels.get(top)
            for t, a in ans.items():
                if t in labels or ref is None:
                    continue
                if t == top:
                    labels[t] = 1.0  # ungraded: the reference agrees with itself
                    continue
                form = comp.canonical([a["answer"]])[0]
                agree = form is not None and comp.same(form, ref)
                if top_label is None:
                    labels[t] = 1.0 if agree else 0.0
                elif agree:
                    labels[t] = top_label
                elif top_label == 1.0:
                    labels[t] = 0.0  # disagrees with a right answer; disagreeing with a wrong one says nothing
        out.append(Labelled(j, labels, graded))
    return out


def bench_rows(labelled: Sequence[Labelled], tiers: Sequence[str]) -> list[dict[str, Any]]:
    """The jobs every tier answered and labelled, as benchmarks-format rows (models = tier names)."""
    rows = []
    for lj in labelled:
        ans = answered(lj.job)
        if not all(t in ans and t in lj.labels for t in tiers):
            continue
        inp = lj.job["input"] or {}
        responses = {}
        for t in tiers:
            r = response_of(ans[t])
            r["correct"] = lj.labels[t]
            responses[t] = r
        rows.append({"id": lj.job["id"], "dataset": "live", "source": "cascade retune", "split": "train",
                     "category": inp.get("category"), "prompt": inp.get("prompt", ""), "responses": responses})
    return rows


@dataclass
class Audit:
    jobs: int = 0
    spent: float = 0.0
    batch_id: str | None = None


def run_audit(portfolio: Portfolio, store: PolicyStore, settings: Settings, share: float, max_usd: float,
              limit: int, seed: int, say: Callable[[str], None]) -> Audit:
    """Send `share` of the recent jobs that never reached the top tier through every tier
    (the calibration path: `every-tier`, an ordinary batch), spending at most `max_usd`."""
    top = portfolio.tiers[-1].name
    recent = store.finished_jobs(portfolio.digest, limit)
    # in id order: the draw is the same whatever order the jobs finished in
    early = sorted((j for j in recent if top not in answered(j) and (j["input"] or {}).get("prompt")),
                   key=lambda j: j["id"])
    n = min(len(early), math.floor(share * len(early) + 0.5))
    # what one audited job costs (every tier called): per tier, the larger of its mean recorded
    # call cost and the calibration's estimate at its configured price
    per_job = 0.0
    for t in portfolio.tiers:
        costs = [a["cost_usd"] for j in recent for a in j["attempts"] if a["tier"] == t.name and a["error"] is None]
        observed = math.fsum(costs) / len(costs) if costs else 0.0
        per_job += max(observed, estimate_tier(t, [j["input"]["prompt"] for j in early[:50]]) / max(1, min(50, len(early))))
    if per_job > 0 and n * per_job > max_usd:
        fit = math.floor(max_usd / per_job)
        say(f"audit: {n} job(s) would cost about ${n * per_job:.6g}, over the ${max_usd:g} cap: {fit} drawn")
        n = fit
    if n == 0:
        say(f"audit: none of {len(early)} recent job(s) that stopped below the top tier drawn (share {share:g})")
        return Audit()
    drawn = sorted(random.Random(seed).sample(range(len(early)), n))
    items = [Item(key=early[i]["id"], seq=k, data={**early[i]["input"], "id": early[i]["id"]})
             for k, i in enumerate(drawn)]
    full = calibration_portfolio(portfolio)
    # one id per draw: a re-run of the same retune resumes its audit instead of paying again
    drawn_ids = hashlib.sha256("\n".join(early[i]["id"] for i in drawn).encode()).hexdigest()[:12]
    batch_id = f"audit-{portfolio.digest[:8]}-{drawn_ids}"
    # in slices, each sent only if the spend so far plus its estimate (per job: the larger of
    # the estimate above and the mean measured so far) stays within the cap; the batch's own
    # cap (run_batch max_cost) stops a slice that overshoots anyway
    spent, sent, size = 0.0, 0, max(1, math.ceil(n / AUDIT_SLICES))
    batches = BatchStore(settings.db_url)
    while sent < n:
        part = min(size, n - sent)
        if sent and spent + part * max(per_job, spent / sent) > max_usd:
            say(f"audit: stopped after {sent} job(s): the next {part} would pass the ${max_usd:g} cap")
            break
        try:
            run_batch(items[:sent + part], full, settings=settings, batch_id=batch_id,
                      source="cascade retune audit", progress=False, max_cost=max_usd)
        except BatchError as e:  # the cap stopped it: what finished is stored and labelled like the rest
            say(f"audit: {e}")
            sent += part
            spent = (batches.batch(batch_id) or {}).get("total_cost", math.nan)
            break
        sent += part
        spent = batches.batch(batch_id)["total_cost"]
    say(f"audit: {sent} of {len(early)} recent job(s) that stopped below {top} sent through every tier "
        f"(batch {batch_id}): ${spent:.6g} of the ${max_usd:g} cap")
    n = sent
    return Audit(n, spent, batch_id)


@dataclass
class Retuned:
    version: int
    policy: dict[str, Any]
    rows: int
    jobs: int
    graded_labels: int
    agreement_labels: int
    audit: Audit
    live_version: int


def retune(portfolio: Portfolio, settings: Settings, comparator: Comparator, *, family: str | None = None,
           target: Target | None = None, limit: int = 5000, audit_share: float | None = None,
           audit_max_usd: float | None = None, seed: int = 0, min_rows: int = MIN_ROWS,
           holdout: float = HOLDOUT, say: Callable[[str], None] = print) -> Retuned:
    """Label the portfolio's recent jobs, refit the live version's family (or `family`)
    on those every tier answered, and store the result as a candidate version."""
    store = policy_store(settings)
    tiers = portfolio.tier_names
    if len(tiers) < 2:
        raise RetuneError("the portfolio has one tier: there is no cascade to retune")
    live_v = store.promoted(portfolio.digest)
    live = version_policy(store, portfolio, live_v)
    family = family or live["name"]
    share = settings.retune_audit_share if audit_share is None else audit_share
    cap = settings.retune_audit_max_usd if audit_max_usd is None else audit_max_usd
    audit = run_audit(portfolio, store, settings, share, cap, limit, seed, say) if share > 0 else Audit()
    jobs = store.finished_jobs(portfolio.digest, limit)
    audited = store.finished_jobs(calibration_portfolio(portfolio).digest, limit)  # audits and calibrations
    jobs += audited
    labelled = label_jobs(jobs, tiers, comparator)
    kept_out = sum(held_out(lj.job["id"], holdout, seed) for lj in labelled if lj.labels)
    labelled = [lj for lj in labelled if not held_out(lj.job["id"], holdout, seed)]
    rows = bench_rows(labelled, tiers)
    used = {r["id"] for r in rows}
    graded = sum(lj.graded for lj in labelled if lj.job["id"] in used)
    agreed = sum(len(lj.labels) - lj.graded for lj in labelled if lj.job["id"] in used)
    say(f"retune: {len(jobs)} finished job(s); {len(rows)} answered by every tier and labelled "
        f"({graded} tier label(s) from grades, {agreed} by agreement with {tiers[-1]}); {kept_out} labelled "
        f"job(s) kept out of the fit ({holdout:g}) for the shadow comparison")
    if len(rows) < min_rows:
        raise RetuneError(
            f"only {len(rows)} job(s) with every tier's answer labelled, fewer than {min_rows}: grade more jobs "
            f"(`cascade feedback add`) or send a share of live jobs through every tier "
            f"(`--audit-share`, capped by `--audit-max-usd`)")
    if not used & {j["id"] for j in audited}:
        say("retune: no audit: the rows are the jobs that reached the top tier, harder than the traffic at large")
    if target is None:
        # the live version's accuracy on these rows: the candidate must keep it, at the lowest cost
        # (parity with the best single tier is no target under agreement labels: the top agrees with itself)
        live_policy = build_policy(portfolio, live)
        kept = [replay(live_policy, portfolio, lj.job).tier for lj in labelled if lj.job["id"] in used]
        live_acc = math.fsum(0.0 if t is None else lj.labels[t]
                             for t, lj in zip(kept, (lj for lj in labelled if lj.job["id"] in used))) / len(kept)
        target = Target.accuracy(live_acc)
        say(f"retune: target: the accuracy of the promoted version {live_v} on these rows, {live_acc:.4f}, "
            f"at the lowest cost")
    signal = (live.get("params") or {}).get("signal")
    with tempfile.TemporaryDirectory(prefix="cascade-retune-") as tmp:
        data = Path(tmp) / "live.jsonl.gz"
        with gzip.open(data, "wt", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tuned = tune(data, family, target, Path(tmp) / "policy.json", fit_split="all",
                     models=tiers, signal=signal if signal in ("logprob", "p_true") else None, seed=seed)
    spec = {"name": tuned.policy.name, "params": tuned.policy.params,
            "fitted": {k: v for k, v in tuned.policy.fitted.items() if k != "data"}}
    build_policy(portfolio, spec)  # fits this portfolio's tiers, or raises naming why
    info = {"rows": len(rows), "jobs": len(jobs), "graded_labels": graded, "agreement_labels": agreed,
            "audit_jobs": audit.jobs, "audit_usd": audit.spent, "family": family, "from_version": live_v,
            "holdout": holdout, "seed": seed, "target": target.as_json(),
            "train_accuracy": tuned.fitted.train_accuracy, "train_cost": tuned.fitted.train_cost}
    version = store.add(portfolio.digest, spec, file_policy(portfolio), source="retune", info=info)
    return Retuned(version, spec, len(rows), len(jobs), graded, agreed, audit, live_v)


# --- shadow -------------------------------------------------------------------------------------

@dataclass
class Replayed:
    tier: str | None  # the tier whose answer is final (None: rejected)
    cost: float
    calls: list[str]
    missing: str | None = None  # why it cannot be replayed from what was recorded
    need: int | None = None  # the tier (index) whose answer was never recorded, if that is why


def replay(policy: Policy, portfolio: Portfolio, job: dict[str, Any]) -> Replayed:
    """The job under `policy`, from its recorded attempts only: the calls the policy
    makes, the answer it keeps and what it costs; `missing` says what a call would
    need that was never recorded (a tier not called, a signal not asked for)."""
    rec = {a["tier"]: a for a in job["attempts"]}
    query = query_of(job["id"], job["input"] or {})
    start = cascade.start(policy, query)
    i, history, calls = start.tier, [], []
    while True:
        name = portfolio.tiers[i].name
        a = rec.get(name)
        if a is None:
            return Replayed(None, 0.0, calls, missing=f"tier {name} never called", need=i)
        att = attempt_from_row(a)
        lacking = [s for s in policy.needs(i).signals if att.error is None and sig.get(att.signals, s) is None]
        if lacking:
            return Replayed(None, 0.0, calls, missing=f"{', '.join(lacking)} not recorded at {name}")
        history.append(att)
        calls.append(name)
        d = cascade.step(policy, query, start.plan, history)
        if d.action == "escalate":
            i = d.next_tier
            continue
        cost = math.fsum(h.cost_usd for h in history)
        if d.action != "accept":
            return Replayed(None, cost, calls)
        return Replayed(cascade.final_attempt(history, d).tier, cost, calls)


@dataclass
class Shadow:
    version: int
    live_version: int
    jobs: int  # labelled jobs looked at
    compared: int  # replayable under both, their outcome labelled under both
    not_replayable: dict[str, int] = field(default_factory=dict)  # candidate | live -> jobs
    unlabelled: int = 0
    live_accuracy: float = math.nan
    candidate_accuracy: float = math.nan
    live_cost: float = math.nan  # mean per job
    candidate_cost: float = math.nan
    changed: int = 0  # jobs whose final tier differs
    fitted_on: int = 0  # labelled jobs left out: on the fit's side of the hold-out, finished before the version
    called: int = 0  # model calls made for answers never recorded (capped)
    called_usd: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(self).items()}


def call_missing(portfolio: Portfolio, policy: Policy, job: dict[str, Any], settings: Settings,
                 backends: dict[str, Any]) -> dict[str, Any]:
    """The job with the answer `policy` needs next and never recorded: its tier called now
    (the stage's own call: retries, signals, extra calls), the attempt kept in memory only."""
    r = replay(policy, portfolio, job)
    tier = portfolio.tiers[r.need]
    backend = backends.get(tier.name)
    if backend is None:
        backend = backends[tier.name] = build_backend(tier)
    attempt, _ = call_backend(backend, tier, r.need, query_of(job["id"], job["input"] or {}), policy.needs(r.need),
                              settings)
    row = {"tier": attempt.tier, "tier_index": attempt.tier_index, "model": attempt.model, "answer": attempt.text,
           "signals": dict(attempt.signals), "tokens_in": attempt.tokens_in, "tokens_out": attempt.tokens_out,
           "cost_usd": attempt.cost_usd, "latency_ms": attempt.latency_ms, "error": attempt.error,
           "decision": "shadow"}
    return {**job, "attempts": [*job["attempts"], row]}


def shadow(portfolio: Portfolio, settings: Settings, version: int, comparator: Comparator, *,
           limit: int = 5000, max_calls: int = 0) -> Shadow:
    """Replay the recent labelled jobs under `version` and under the promoted version; where
    either needs a tier's answer the job never recorded, call that tier (at most
    `max_calls` calls in all; past that, such jobs are counted as not replayable)."""
    store = policy_store(settings)
    live_v = store.promoted(portfolio.digest)
    row = store.version(portfolio.digest, version)
    cand = build_policy(portfolio, version_policy(store, portfolio, version))
    live = build_policy(portfolio, version_policy(store, portfolio, live_v))
    jobs = store.finished_jobs(portfolio.digest, limit)
    jobs += store.finished_jobs(calibration_portfolio(portfolio).digest, limit)
    labelled = [lj for lj in label_jobs(jobs, portfolio.tier_names, comparator) if lj.labels]
    info = (row or {}).get("info") or {}
    fitted = 0
    if "holdout" in info:  # the jobs the version was fitted on are not evidence for it
        keep = [lj for lj in labelled if held_out(lj.job["id"], info["holdout"], info["seed"])
                or lj.job["finished_at"] > row["created_at"]]
        fitted, labelled = len(labelled) - len(keep), keep
    out = Shadow(version, live_v, len(labelled), 0, {"candidate": 0, "live": 0}, fitted_on=fitted)
    acc = {"live": 0.0, "candidate": 0.0}
    cost = {"live": 0.0, "candidate": 0.0}
    backends: dict[str, Any] = {}
    try:
        for lj in labelled:
            _shadow_one(out, portfolio, {"candidate": cand, "live": live}, lj, settings, backends, max_calls,
                             comparator, acc, cost)
    finally:
        for b in backends.values():
            b.close()
    if out.compared:
        out.live_accuracy, out.candidate_accuracy = acc["live"] / out.compared, acc["candidate"] / out.compared
        out.live_cost, out.candidate_cost = cost["live"] / out.compared, cost["candidate"] / out.compared
    store.set_info(portfolio.digest, version, {"shadow": out.as_json()})  # no row (version 1, none stored): no-op
    return out


def _shadow_one(out: Shadow, portfolio: Portfolio, policies: dict[str, Policy], lj: Labelled, settings: Settings,
                backends: dict[str, Any], max_calls: int, comparator: Comparator, acc: dict[str, float],
                cost: dict[str, float]) -> None:
    """One job of the shadow: replayed under both versions (calling what is missing while
    the cap allows), counted where it cannot be, compared where it can."""
    got = {k: replay(p, portfolio, lj.job) for k, p in policies.items()}
    while out.called < max_calls:
        k = next((k for k, r in got.items() if r.need is not None), None)
        if k is None:
            break
        job = call_missing(portfolio, policies[k], lj.job, settings, backends)
        out.called += 1
        out.called_usd += job["attempts"][-1]["cost_usd"]
        (lj,) = label_jobs([job], portfolio.tier_names, comparator)  # the new answer labelled too
        got = {k: replay(p, portfolio, lj.job) for k, p in policies.items()}
    bad = [k for k, r in got.items() if r.missing]
    for k in bad:
        out.not_replayable[k] += 1
        out.reasons[got[k].missing] = out.reasons.get(got[k].missing, 0) + 1
    if bad:
        return
    if any(r.tier is not None and r.tier not in lj.labels for r in got.values()):
        out.unlabelled += 1
        return
    out.compared += 1
    for k, r in got.items():
        acc[k] += 0.0 if r.tier is None else lj.labels[r.tier]
        cost[k] += r.cost
    out.changed += got["candidate"].tier != got["live"].tier


def render_shadow(s: Shadow) -> list[str]:
    lines = [f"shadow: version {s.version} against the promoted version {s.live_version} on {s.jobs} labelled "
             f"job(s): {s.compared} compared; not replayable from the recorded attempts: "
             f"{s.not_replayable['candidate']} under {s.version}, {s.not_replayable['live']} under "
             f"{s.live_version}; {s.unlabelled} whose kept answer has no label"
             + (f"; {s.fitted_on} job(s) on the fit's side of the hold-out left out" if s.fitted_on else "")
             + (f"; {s.called} tier call(s) made for answers never recorded (${s.called_usd:.6g})"
                if s.called else "")]
    for why, n in sorted(s.reasons.items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"  not replayable: {why}: {n}")
    if s.compared:
        ratio = s.candidate_cost / s.live_cost if s.live_cost else math.nan
        lines.append(f"{'version':<10}{'accuracy':>10}{'cost/job $':>14}")
        lines.append(f"{s.live_version:<10}{s.live_accuracy:>10.4f}{s.live_cost:>14.6g}")
        lines.append(f"{s.version:<10}{s.candidate_accuracy:>10.4f}{s.candidate_cost:>14.6g}")
        lines.append(f"candidate - live: accuracy {s.candidate_accuracy - s.live_accuracy:+.4f}, cost ratio "
                     f"{ratio:.3f}; {s.changed} job(s) would end at another tier")
    return lines
