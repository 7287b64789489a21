"""The task API when the database or the broker is away (docs/operations.md: what is
guaranteed). `cascade serve` reaches the machine's PostgreSQL and Redis through fault
proxies of this test (worker/bench/netproxy.py), which it closes to take either away.

- the database away: `POST /v1/jobs` answers 503 with Retry-After, never a 500; the
  same request sent again with the same Idempotency-Key once it is back makes one job.
- the broker away: the job is committed first, so it is accepted (202) within a few
  seconds (API_PUBLISH_WAIT), its row queued for a tier worker's sweeper to send."""
from __future__ import annotations

import httpx
import pytest
from helpers.api import Serve
from helpers.env import REDIS, private_database, private_redis_prefix
from helpers.servers import free_port
from sqlalchemy import select

from worker.bench.netproxy import FaultProxy
from worker.config.settings import Settings
from worker.ops.migrate import upgrade
from worker.service.tenants import Tenants
from worker.store.engine import engine_for
from worker.store.schema import jobs
from worker.store.tenants import TenantStore

pytestmark = pytest.mark.services


def _proxied(url: str, port: int) -> str:
    scheme, rest = url.split("://", 1)
    auth_host, path = rest.split("/", 1)
    auth = auth_host.rsplit("@", 1)[0] + "@" if "@" in auth_host else ""
    return f"{scheme}://{auth}127.0.0.1:{port}/{path}"


@pytest.fixture
def api(tmp_path):
    with private_database() as pg_url, private_redis_prefix() as prefix:
        upgrade(pg_url)
        pg_port, redis_port = free_port(), free_port()
        redis_host, redis_upstream = REDIS.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
        proxies = {"pg": FaultProxy(("127.0.0.1", pg_port), ("127.0.0.1", 5432)).start(),
                   "redis": FaultProxy(("127.0.0.1", redis_port), (redis_host, int(redis_upstream))).start()}
        portfolio = tmp_path / "p.toml"
        portfolio.write_text('[policy]\nname = "single"\ntier = "t0"\n\n[[tiers]]\nname = "t0"\n'
                             'backend = { kind = "openai", model = "m0", base_url = "http://127.0.0.1:9/v1" }\n')
        env = {"CASCADE_BROKER_URL": _proxied(REDIS, redis_port), "CASCADE_DATABASE_URL": _proxied(pg_url, pg_port),
               "CASCADE_REDIS_PREFIX": prefix, "CASCADE_HOME": str(tmp_path / "home")}
        _, key = Tenants(TenantStore(pg_url), Settings(database_url=pg_url)).create_key("a")
        serve = Serve(env, portfolio, tmp_path / "serve.log")
        try:
            serve.wait_ready()
            with httpx.Client(base_url=serve.url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as h:
                yield h, proxies, pg_url, serve
        finally:
            serve.stop()
            for p in proxies.values():
                p.close()


def _jobs(pg_url: str) -> list:
    with engine_for(pg_url).connect() as c:
        return c.execute(select(jobs.c.id, jobs.c.item_key, jobs.c.status).where(jobs.c.tenant == "a")).all()


def test_the_database_away_is_a_503_with_retry_after_and_the_retry_makes_one_job(api):
    h, proxies, pg_url, serve = api
    assert h.post("/v1/jobs", json={"prompt": "before"}, headers={"Idempotency-Key": "k1"}).status_code == 202
    proxies["pg"].close()  # the database unreachable: new connections refused, open ones reset
    r = h.post("/v1/jobs", json={"prompt": "during"}, headers={"Idempotency-Key": "k2"})
    assert r.status_code == 503, (r.status_code, r.text, serve.output())
    assert r.headers["Retry-After"] == "5" and r.json()["error"]["code"] == "database_unavailable"
    port = proxies["pg"].listen[1]
    proxies["pg"] = FaultProxy(("127.0.0.1", port), ("127.0.0.1", 5432)).start()  # back
    again = h.post("/v1/jobs", json={"prompt": "during"}, headers={"Idempotency-Key": "k2"})
    assert again.status_code in (200, 202), again.text
    assert h.post("/v1/jobs", json={"prompt": "during"}, headers={"Idempotency-Key": "k2"}).status_code == 200
    assert sorted(r.item_key for r in _jobs(pg_url)) == ["k1", "k2"]


def test_the_broker_away_still_accepts_what_it_committed(api):
    h, proxies, pg_url, serve = api
    proxies["redis"].close()  # the broker unreachable
    r = h.post("/v1/jobs", json={"prompt": "while the broker is away"}, headers={"Idempotency-Key": "k3"})
    assert r.status_code == 202, (r.status_code, r.text, serve.output())
    assert [(j.item_key, j.status) for j in _jobs(pg_url)] == [("k3", "queued")]  # for the sweeper to send
    assert "submit.send_deferred" in serve.output()
