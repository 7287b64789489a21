"""Policy versions in the store (SQLite here; PostgreSQL in tests/pipeline/test_policy_*):
numbering, one promoted version, promotion and rollback history, bad requests named."""
from __future__ import annotations

import pytest

from worker.ops.migrate import upgrade
from worker.store.policies import PolicyStore, PolicyVersionError
from worker.store.schema import now, portfolios

FILE = {"name": "threshold", "params": {"thresholds": {"a": 0.5}}}


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    s = PolicyStore(url)
    with s.tx() as c:
        c.execute(portfolios.insert().values(digest="d1", spec={}, created_at=now()))
    return s


def test_versions_promotions_and_rollbacks(store):
    assert store.promoted("d1") == 1 and store.versions("d1") == []
    assert [store.add("d1", {"name": "x", "params": {"k": k}}, FILE, source="manual") for k in (2, 3)] == [2, 3]
    rows = {r["version"]: r for r in store.versions("d1")}
    assert rows[1]["policy"] == FILE and rows[1]["state"] == "promoted" and rows[1]["source"] == "portfolio"
    assert rows[2]["state"] == rows[3]["state"] == "candidate"
    assert store.promote("d1", 2) == 1 and store.promote("d1", 3) == 2
    assert store.promoted("d1") == 3 and store.promoted_of(["d1", "other"]) == {"d1": 3, "other": 1}
    assert [r["state"] for r in store.versions("d1")] == ["retired", "retired", "promoted"]
    # rollbacks walk back through the promotions: 3 -> 2 -> 1, then nothing
    assert store.rollback("d1") == (3, 2)
    assert store.rollback("d1") == (2, 1)
    with pytest.raises(PolicyVersionError, match="nothing to roll back to"):
        store.rollback("d1")
    assert store.promoted("d1") == 1
    # an explicit promotion starts afresh
    assert store.promote("d1", 3) == 1 and store.rollback("d1") == (3, 1)


def test_bad_requests_are_named(store):
    with pytest.raises(PolicyVersionError, match="no policy version 2 for this portfolio; versions: 1"):
        store.promote("d1", 2)
    with pytest.raises(PolicyVersionError, match="already the promoted one"):
        store.promote("d1", 1)
    store.add("d1", {"name": "x", "params": {}}, FILE, source="manual")
    with pytest.raises(PolicyVersionError, match="no policy version 5 for this portfolio; versions: 1, 2"):
        store.promote("d1", 5)
    store.promote("d1", 2)
    with pytest.raises(PolicyVersionError, match="changed meanwhile"):
        store.rollback("d1", expect=7)
    assert store.promoted("d1") == 2
