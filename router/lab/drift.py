"""Has production traffic moved away from the rows a policy was tuned on?

`profile` replays a tuned chain policy on its tuning rows and records, per tier of
the chain, how many queries reached it, how many it accepted and the confidences
it saw; `cascade tune` stores that in the policy file (fitted.reference).

`compare` tests each tier of a production batch against that reference:
- accept rate: Fisher's exact two-sided test of the 2x2 table (accepted, passed
  on) x (production, tuning rows); H0: the tier accepts as often as on the tuning
  rows (two-sample: the tuning rate is an estimate too);
- confidences: the two-sample Kolmogorov-Smirnov test (H0: same distribution);
then Holm's correction over all the tests at `level`, so the chance of any false
warning on unchanged traffic stays <= level. A rejected test is a warning: the
tuned knobs (and any risk guarantee) were fitted on traffic unlike today's.
Tiers with fewer than `min_rows` production attempts are not tested (reported).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.stats import fisher_exact, ks_2samp

from router.lab.risk import holm

MAX_REFERENCE_VALUES = 2000


def profile(outcomes: Sequence[Any], table: Any, signal: str | None) -> dict[str, Any]:
    """The reference from replayed tuning rows (`simulate` outcomes in the order of
    `table`'s rows): per tier called at least once, how many queries reached it, how
    many it accepted and the confidences it saw."""
    index = {t.name: i for i, t in enumerate(table.tiers)}
    tiers: dict[str, dict[str, Any]] = {}
    for j, o in enumerate(outcomes):
        for name in o.calls:
            t = tiers.setdefault(name, {"reached": 0, "accepted": 0, "confidences": []})
            t["reached"] += 1
            t["accepted"] += int(o.status == "succeeded" and o.calls[-1] == name)  # where the accept was decided
            if signal is not None:
                v = table.conf[signal][index[name], j]
                if math.isfinite(v):
                    t["confidences"].append(float(v))
    for t in tiers.values():
        vals = sorted(t["confidences"])
        if len(vals) > MAX_REFERENCE_VALUES:  # keep the file small: evenly spaced order statistics
            idx = np.round(np.linspace(0, len(vals) - 1, MAX_REFERENCE_VALUES)).astype(int)
            vals = [vals[i] for i in idx]
        t["confidences"] = [round(v, 6) for v in vals]
    return {"signal": signal, "rows": len(outcomes), "tiers": tiers}


def production(observations: Sequence[dict[str, Any]], signal: str | None) -> dict[str, dict[str, Any]]:
    """Production calls (tier, decision, signals) -> per tier calls, accepts, confidences."""
    out: dict[str, dict[str, Any]] = {}
    for o in observations:
        t = out.setdefault(o["tier"], {"calls": 0, "accepted": 0, "confidences": []})
        t["calls"] += 1
        t["accepted"] += int(o["decision"] == "accept")
        v = (o.get("signals") or {}).get(signal) if signal else None
        if isinstance(v, (int, float)) and math.isfinite(v):
            t["confidences"].append(float(v))
    return out


@dataclass
class Finding:
    tier: str
    test: str  # "accept rate" | "confidence"
    p_value: float
    detail: str
    drift: bool = False


def compare(reference: dict[str, Any], production: dict[str, dict[str, Any]], *, level: float = 0.01,
            min_rows: int = 30) -> tuple[list[Finding], list[str]]:
    """production: tier -> {"calls": n, "accepted": k, "confidences": [...]}.
    Returns the findings (drift=True where Holm rejects) and notes on untested tiers."""
    findings: list[Finding] = []
    notes: list[str] = []
    for tier, ref in reference.get("tiers", {}).items():
        prod = production.get(tier)
        n = int(prod["calls"]) if prod else 0
        if n < min_rows:
            notes.append(f"{tier}: {n} production call(s), fewer than {min_rows}: not tested")
            continue
        if ref["reached"] > 0:
            p0 = ref["accepted"] / ref["reached"]
            k = int(prod["accepted"])
            m, a = int(ref["reached"]), int(ref["accepted"])
            p = fisher_exact([[k, n - k], [a, m - a]]).pvalue
            findings.append(Finding(tier, "accept rate", float(p),
                                    f"accepts {k / n:.3f} of {n} calls, {p0:.3f} of {ref['reached']} on the tuning rows"))
        conf = [float(x) for x in prod.get("confidences", []) if x is not None and math.isfinite(x)]
        if len(conf) >= min_rows and len(ref["confidences"]) >= min_rows:
            ks = ks_2samp(conf, ref["confidences"])
            findings.append(Finding(tier, "confidence", float(ks.pvalue),
                                    f"median {reference.get('signal', 'confidence')} {np.median(conf):.4g} "
                                    f"(KS D={ks.statistic:.3f}) vs {np.median(ref['confidences']):.4g} on the tuning rows"))
    if findings:
        rejected = holm([f.p_value for f in findings], level)
        for f, r in zip(findings, rejected):
            f.drift = bool(r)
    return findings, notes
