"""Cost-quality metrics of routers on labelled data (pure functions).

Definitions (what the code below computes; the JSON keys of `cascade evaluate`):

- accuracy: mean `correct` of the answer each query ends with (fractional labels
  are averaged as they are). cost: mean per query of the cost of every call made
  (escalations included). latency_ms: mean per query of the summed latency of the
  calls, over the queries whose calls all recorded one (`latency_rows` says how
  many); null when none did.
- best_single: the single model with the highest test accuracy (ties: the
  cheaper, then the earlier), with that accuracy and its mean cost per query.
- oracle: per query, the cheapest model among those with the highest `correct`
  (for 0/1 labels: the cheapest correct model, else the cheapest model); its
  accuracy and mean cost. Not a realisable router: an upper bound.
- frontier curve: from a router's test points (cost, accuracy), the
  non-decreasing upper concave hull (RouterBench's "non-decreasing convex hull"):
  points are sorted by cost, a point is kept only if it is more accurate than
  every cheaper point, and the upper hull of those is linearly interpolated
  (mixing two configurations at random realises any point on the segment). Left
  of its cheapest vertex and right of its dearest one the curve is flat.
- aiq (RouterBench, Hu et al. 2024, "Average Improvement in Quality"): with cost
  normalised to x = (c - c_lo) / (c_hi - c_lo), c_lo / c_hi the test mean costs of
  the cheapest / most expensive single model, AIQ = integral over x in [0, 1] of
  the frontier curve, i.e. its mean accuracy over the normalised cost range
  (exact integral of the piecewise-linear curve).
- RouteLLM metrics (files without costs, where cost x = share of queries calling
  the strong model, 0..1): PGR(x) = (f(x) - acc_weak) / (acc_strong - acc_weak)
  with f the frontier curve; apgr = integral of PGR over x in [0, 1] (the same
  curve as AIQ, so apgr = (aiq - acc_weak) / (acc_strong - acc_weak));
  cpt50 / cpt80 = the smallest x at which PGR reaches 0.5 / 0.8, read on the hull
  between its vertices (no flat extension to the left: the router must actually
  reach it), null when it never does. RouteLLM interpolates its raw threshold
  sweep instead of the hull; on a monotone sweep the two agree.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np

from router.core.errors import UserError


class MetricsError(UserError):
    """Labelled data on which a metric is undefined (the message says why)."""


def summarize(outcomes: Sequence[Any], tiers: Sequence[Any] | None = None) -> dict[str, Any]:
    """Accuracy, cost, latency and calls per model of simulated outcomes."""
    n = len(outcomes)
    if n == 0:
        raise ValueError("no outcomes to summarize")
    model_of = {t.name: t.model for t in tiers} if tiers is not None else {}
    failed = [o for o in outcomes if o.status != "succeeded"]
    unlabelled = [o for o in outcomes if o.status == "succeeded" and o.correct is None]
    if unlabelled:
        raise MetricsError(f"{len(unlabelled)} outcome(s) end on an answer without a `correct` label (e.g. {unlabelled[0].id!r})")
    correct = sum(o.correct for o in outcomes if o.status == "succeeded")  # a failed query scores 0
    cost = sum(o.cost_usd for o in outcomes)
    lats = [o.latency_ms for o in outcomes if o.latency_ms is not None and math.isfinite(o.latency_ms)]
    calls: dict[str, int] = {}
    for o in outcomes:
        for t in o.calls:
            m = model_of.get(t, t)
            calls[m] = calls.get(m, 0) + 1
    return {
        "rows": n,
        "accuracy": correct / n,
        "cost": cost / n,
        "latency_ms": (sum(lats) / len(lats)) if lats else None,
        "latency_rows": len(lats),
        "calls": calls,
        "failed": len(failed),
    }


def oracle(correct: np.ndarray, cost: np.ndarray) -> dict[str, float]:
    """correct, cost: (models, rows). Per row the cheapest model with the highest label."""
    best = correct.max(axis=0)
    masked = np.where(correct >= best[None, :] - 1e-12, cost, np.inf)
    pick = masked.argmin(axis=0)
    cols = np.arange(correct.shape[1])
    return {"accuracy": float(best.mean()), "cost": float(cost[pick, cols].mean())}


def best_single(singles: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """singles: [{"name", "accuracy", "cost", ...}] in model order."""
    if not singles:
        raise ValueError("no single models")
    i = min(range(len(singles)), key=lambda j: (-singles[j]["accuracy"], singles[j]["cost"], j))
    s = singles[i]
    return {"name": s["name"], "accuracy": s["accuracy"], "cost": s["cost"]}


def hull(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Non-decreasing upper concave hull of (cost, accuracy) points, by cost."""
    pts = sorted({(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)},
                 key=lambda p: (p[0], -p[1]))
    stair: list[tuple[float, float]] = []
    for x, y in pts:
        if not stair or y > stair[-1][1]:
            if stair and stair[-1][0] == x:
                continue  # same cost, sorted by accuracy descending: the first one is best
            stair.append((x, y))
    out: list[tuple[float, float]] = []
    for p in stair:
        while len(out) >= 2:
            (x1, y1), (x2, y2) = out[-2], out[-1]
            # drop the middle point if it lies on or below the segment out[-2] -> p
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                out.pop()
            else:
                break
        out.append(p)
    return out


def curve_at(vertices: Sequence[tuple[float, float]], x: float | np.ndarray) -> float | np.ndarray:
    xs = [v[0] for v in vertices]
    ys = [v[1] for v in vertices]
    return np.interp(x, xs, ys)  # flat outside the vertices


def mean_over(vertices: Sequence[tuple[float, float]], lo: float = 0.0, hi: float = 1.0) -> float:
    """Exact mean of the piecewise-linear curve over [lo, hi]."""
    if not vertices:
        raise ValueError("empty curve")
    if hi <= lo:
        raise ValueError("empty range")
    xs = sorted({lo, hi} | {v[0] for v in vertices if lo < v[0] < hi})
    ys = curve_at(vertices, np.array(xs))
    area = float(np.sum((ys[1:] + ys[:-1]) / 2 * np.diff(xs)))
    return area / (hi - lo)


def normalized(points: Iterable[tuple[float, float]], c_lo: float, c_hi: float) -> list[tuple[float, float]]:
    span = c_hi - c_lo
    return [((c - c_lo) / span, a) for c, a in points]


def aiq(points: Sequence[tuple[float, float]], c_lo: float, c_hi: float) -> float:
    """RouterBench AIQ of test (cost, accuracy) points over [c_lo, c_hi]."""
    if not points:
        raise ValueError("no frontier points")
    if not c_hi > c_lo:
        raise MetricsError(f"the single models' costs do not span a range (cheapest {c_lo}, dearest {c_hi})")
    return mean_over(hull(normalized(points, c_lo, c_hi)), 0.0, 1.0)


def first_reach(vertices: Sequence[tuple[float, float]], level: float) -> float | None:
    """Smallest x where the hull reaches `level` (between vertices), None if never."""
    for i, (x, y) in enumerate(vertices):
        if y >= level - 1e-12:
            if i == 0:
                return x
            x0, y0 = vertices[i - 1]
            return x0 + (level - y0) / (y - y0) * (x - x0)
    return None


def routellm(points: Sequence[tuple[float, float]], acc_weak: float, acc_strong: float) -> dict[str, Any]:
    """apgr, cpt50, cpt80 of (share of strong calls, accuracy) test points."""
    gap = acc_strong - acc_weak
    if not gap > 0:
        return {"apgr": None, "cpt50": None, "cpt80": None,
                "note": f"undefined: the strong model is not more accurate than the weak one ({acc_strong:.4f} vs {acc_weak:.4f})"}
    v = hull(points)
    pgr = [((x), (y - acc_weak) / gap) for x, y in v]
    out: dict[str, Any] = {"apgr": mean_over(pgr, 0.0, 1.0)}
    for pct in (50, 80):
        x = first_reach(pgr, pct / 100)
        out[f"cpt{pct}"] = None if x is None or x > 1 + 1e-12 else max(0.0, min(1.0, x))
    return out
