"""The cluster demo as the README runs it (`make demo-cluster` is `cascade demo
--cluster`): a llama-cpp-python server per local model, the machine's Redis and
PostgreSQL, one `cascade worker` process per tier, `cascade serve` and Flower, the
questions submitted as an OpenAI batch through the official SDK. Fewer questions,
one llama.cpp thread and a database of the test's own; everything else as written.
Afterwards nothing it started is left: no process, no database, no Redis key."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import uuid

import pytest
from helpers.env import PG_ADMIN, REDIS, REPO

pytestmark = [pytest.mark.models, pytest.mark.services]


def listening(url: str) -> bool:
    host, port = re.match(r"https?://([^:/]+):(\d+)", url).groups()
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_make_demo_cluster_runs_the_distributed_mode_end_to_end_and_leaves_nothing(tmp_path):
    recipe = subprocess.run(["make", "-n", "demo-cluster"], cwd=REPO, capture_output=True, text=True, check=True)
    assert "cascade demo --cluster" in recipe.stdout, recipe.stdout
    database = f"cascade_test_cluster_{uuid.uuid4().hex[:10]}"
    cmd = [sys.executable, "-m", "worker.cli", "demo", "--cluster", "--n", "4", "--threads", "1", "--json",
           "--database", database, "--postgres", PG_ADMIN.rsplit("/", 1)[0], "--redis", REDIS,
           "--out", str(tmp_path / "table.txt")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    out, err = done.stdout, done.stderr
    assert "distributed: Redis and PostgreSQL, one `cascade worker` per tier" in out
    for row in ("tiny", "small", "medium", "cascade", "always medium"):
        assert re.search(rf"^{row}\s", out, re.M), out
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["n"] == 4
    # every question answered through the cluster, by some tier of the chain, in both runs
    assert sum(figures["cascade"]["answered"].values()) == 4, figures
    assert figures["always_top"]["model_time_s"] > 0 and figures["cascade"]["model_time_s"] > 0
    jobs = [json.loads(line) for line in (tmp_path / "table.jobs.jsonl").read_text().splitlines()]
    assert sorted(j["run"] for j in jobs) == ["always-medium"] * 4 + ["cascade"] * 4
    assert all(j["status"] == "succeeded" and j["attempts"] for j in jobs), jobs
    assert all(a["tier"] == "medium" for j in jobs if j["run"] == "always-medium" for a in j["attempts"])
    # Flower's address was given while it ran; the API's and Flower's ports are closed now
    flower = re.search(r"Flower (http://127\.0\.0\.1:\d+) \(user demo, password \S+\)", err)
    api = re.search(r"API (http://127\.0\.0\.1:\d+)", err)
    assert flower and api, err
    assert not listening(flower.group(1)) and not listening(api.group(1))
    # its database is dropped and its Redis keys removed
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN)
    with admin.connect() as c:
        assert c.execute(text("SELECT count(*) FROM pg_database WHERE datname = :d"), {"d": database}).scalar() == 0
    admin.dispose()
    import redis

    prefix = re.search(r"prefix (cascade-demo-[0-9a-f]+:)", err).group(1)
    assert not list(redis.Redis.from_url(REDIS).scan_iter(match=f"{prefix}*", count=1000))
