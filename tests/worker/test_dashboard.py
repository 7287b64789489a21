"""The Grafana dashboard in ops/ queries only metrics the workers export."""
from __future__ import annotations

import json
import re

from helpers.env import REPO
from prometheus_client import REGISTRY

import worker.ops.canary  # noqa: F401 (registers its gauges)
import worker.ops.metrics  # noqa: F401 (registers its metrics)


def exported_names() -> set[str]:
    # a labelled metric has no samples before its first use: name its series by type
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    names = {fam.name + sfx for fam in REGISTRY.collect() for sfx in suffixes.get(fam.type, [""])}
    return names | {"cascade_queue_depth", "cascade_queue_oldest_age_seconds"}  # read from Redis per scrape


def test_every_dashboard_query_names_an_exported_metric():
    dash = json.loads((REPO / "ops" / "grafana-dashboard.json").read_text())
    exported = exported_names()
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b(cascade_[a-z_]+)", target["expr"]))
            assert names, target["expr"]
            used |= names
    assert used - exported == set()
    # every per-tier signal the issue asks for has a panel
    for needed in ("cascade_calls_total", "cascade_decisions_total", "cascade_call_failures_total",
                   "cascade_queue_depth", "cascade_queue_oldest_age_seconds", "cascade_call_latency_seconds_bucket",
                   "cascade_tokens_total", "cascade_cost_usd_total", "cascade_top_tier_cost_usd_total",
                   "cascade_job_cost_usd_total", "cascade_canary_age_seconds"):
        assert needed in used, needed
