"""The production image, built and run: `make image`'s script builds docker/Dockerfile
with podman (the local Debian base made once and kept, pip's downloads in a build
cache), then the tier workers, `cascade serve` and Flower run in containers from it
against this machine's Redis and PostgreSQL (host network; the test's own database
and Redis key prefix), with the replay portfolio of ops/portfolio.example.toml and
the shared benchmarks mounted read-only, as docker/compose.yaml mounts them. A batch
goes in through POST /v1/batches; the jobs read back from PostgreSQL equal the
offline simulation of the same portfolio, row for row.

Skipped, saying why, only where podman cannot run containers (not installed, not
root, or its runtime refuses). Build output: $CASCADE_TEST_OUTPUT/container/ (default
out/tests/container/)."""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from helpers.env import BENCH, REDIS, REPO, private_database, private_redis_prefix
from helpers.servers import free_port
from sqlalchemy import create_engine, text

from router.core.portfolio import load_portfolio
from router.core.records import load_dataset
from router.lab.simulate import simulate, tiers_of

pytestmark = [pytest.mark.services, pytest.mark.timeout(2400)]  # a cold build makes the base: minutes

N_ITEMS = 60
TIERS = [t.name for t in load_portfolio(REPO / "ops" / "portfolio.example.toml").tiers]
FLOWER_AUTH = "ops:container-test"


def podman_env() -> dict[str, str]:
    """The environment `source docker/podman/env.sh` gives: this project's podman settings."""
    out = subprocess.run(["bash", "-c", "source docker/podman/env.sh && env -0"], cwd=REPO, check=True,
                         capture_output=True).stdout
    return dict(kv.split("=", 1) for kv in out.decode().split("\0") if "=" in kv)


class Podman:
    def __init__(self, env: dict[str, str], logdir: Path):
        self.env = env
        self.logdir = logdir
        self.names: list[str] = []
        self.run_id = uuid.uuid4().hex[:8]

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        r = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... exited {r.returncode}:\n{r.stderr[-3000:]}")
        return r

    def start(self, role: str, image: str, env: dict[str, str], mounts: list[str], *command: str) -> str:
        name = f"cascade-test-{self.run_id}-{role}"
        args = ["run", "-d", "--name", name, "--network", "host", "--label", f"cascade-test={self.run_id}"]
        for k, v in env.items():
            args += ["-e", f"{k}={v}"]
        for m in mounts:
            args += ["-v", m]
        self.names.append(name)
        self(*args, image, *command)
        return name

    def running(self, name: str) -> bool:
        r = self("inspect", "--format", "{{.State.Running}}", name, check=False)
        return r.stdout.strip() == "true"

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + (lambda r: (r.stdout + r.stderr)[-2500:])(self("logs", "--tail", "40", n,
                                                                                          check=False))
                         for n in self.names)

    def remove_all(self) -> None:
        for n in self.names:
            self("rm", "-f", "-t", "10", n, check=False, timeout=120)


def output_dir() -> Path:
    out = Path(os.environ.get("CASCADE_TEST_OUTPUT", REPO / "out" / "tests")) / "container"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def podman() -> Podman:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed: ops/setup.sh installs Debian's podman, runc, fuse-overlayfs and "
                    "debootstrap with apt-get (needs root); install them and re-run")
    if os.geteuid() != 0:
        pytest.skip("the container test runs podman as root, with this project's podman settings "
                    "(docker/podman/); run it as root")
    return Podman(podman_env(), output_dir())


@pytest.fixture(scope="module")
def base(podman) -> str:
    """The local Debian base (made once per machine, then found in podman's store)."""
    started = time.monotonic()
    r = subprocess.run(["bash", "docker/podman/base.sh"], cwd=REPO, env=podman.env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, f"docker/podman/base.sh failed:\n{r.stderr[-3000:]}"
    image = r.stdout.strip().splitlines()[-1]
    probe = podman("run", "--rm", image, "python3", "-c", "print('ok')", check=False, timeout=120)
    if probe.returncode != 0 or probe.stdout.strip() != "ok":
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-600:]}")
    print(f"\nbase image {image}: {time.monotonic() - started:.0f} s")
    return image


@pytest.fixture(scope="module")
def image(podman, base) -> str:
    """The image `make image` builds (docker/build.sh, with podman, without the local pack)."""
    log = podman.logdir / "build.log"
    started = time.monotonic()
    with open(log, "w") as f:
        r = subprocess.run(["bash", "docker/build.sh"], cwd=REPO, env={**podman.env, "ENGINE": "podman", "LOCAL": "0",
                                                                       "BASE_IMAGE": base},
                           stdout=f, stderr=subprocess.STDOUT, timeout=1800)
    tail = log.read_text(errors="replace")[-4000:]
    assert r.returncode == 0, f"docker/build.sh failed (full log: {log}):\n{tail}"
    print(f"\n{tail.strip().splitlines()[-1]} (test saw {time.monotonic() - started:.0f} s)")
    return subprocess.run(["bash", "docker/build.sh", "--print-image"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_runtime_image_has_no_compilers_no_pip_a_regular_install_and_a_non_root_user(podman, image):
    inspected = json.loads(podman("image", "inspect", image).stdout)[0]
    assert inspected["Config"]["User"] == "10001:10001"
    assert inspected["Config"]["Entrypoint"] == ["cascade"]
    assert "/opt/cascade/healthcheck.py" in " ".join(inspected["Healthcheck"]["Test"])  # kept: built --format docker
    script = ("for c in gcc cc g++ c++ cmake make git pip pip3; do command -v $c; done; id -u; "
              "ls /src 2>&1; ls /opt/cascade/lib/python3.11/site-packages | grep -E '^(worker|router|migrations)$'; "
              "cat /opt/cascade/lib/python3.11/site-packages/cascade_router-*.dist-info/direct_url.json")
    r = podman("run", "--rm", "--entrypoint", "/bin/sh", image, "-c", script)
    lines = r.stdout.split("\n")
    assert lines[0] == "10001", r.stdout  # no compiler or pip was found before it
    assert "No such file or directory" in lines[1]  # no source tree
    assert lines[2:5] == ["migrations", "router", "worker"]
    assert '"editable": true' not in r.stdout and "editable" not in r.stdout  # a regular install from /src


@pytest.fixture(scope="module")
def deployment(podman, image, bench, tmp_path_factory):
    """Migrated by `cascade db upgrade` in a container, an API key made by `cascade keys
    create` in another, then a worker per tier, the API and Flower, each in its container."""
    with private_database() as pg_url, private_redis_prefix() as prefix:
        ports = {"api": free_port(), "flower": free_port(), **{t: free_port() for t in TIERS}}
        env = {"CASCADE_BROKER_URL": REDIS, "CASCADE_DATABASE_URL": pg_url, "CASCADE_REDIS_PREFIX": prefix,
               "CASCADE_PORTFOLIO": "/etc/cascade/portfolio.toml", "CASCADE_VISIBILITY_TIMEOUT": "60",
               "CASCADE_REMOTE_CONTROL": "flower", "CASCADE_CANARY_INTERVAL": "2"}
        # as docker/compose.yaml mounts them: the example portfolio reads ../../shared from /etc/cascade
        mounts = [f"{REPO / 'ops' / 'portfolio.example.toml'}:/etc/cascade/portfolio.toml:ro",
                  f"{BENCH}:/shared/benchmarks:ro"]
        try:
            once = ["run", "--rm", "--network", "host", *[a for k, v in env.items() for a in ("-e", f"{k}={v}")]]
            podman(*once, image, "db", "upgrade", timeout=180)
            key = podman(*once, image, "keys", "create", "--tenant", "acme", "--name", "container-test",
                         timeout=180).stdout.strip().splitlines()[-1]
            for t in TIERS:
                podman.start(t, image, {**env, "CASCADE_METRICS_PORT": str(ports[t])}, mounts, "worker", "--tier", t)
            podman.start("api", image, env, mounts, "serve", "--host", "127.0.0.1", "--port", str(ports["api"]))
            podman.start("flower", image, {**env, "CASCADE_FLOWER_BASIC_AUTH": FLOWER_AUTH}, mounts,
                         "flower", "--address=127.0.0.1", f"--port={ports['flower']}")
            api = f"http://127.0.0.1:{ports['api']}"
            deadline = time.monotonic() + 180
            while True:
                for n in podman.names:
                    assert podman.running(n), f"{n} exited:\n{podman.logs()}"
                try:
                    if httpx.get(f"{api}/readyz", timeout=3).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"the API never became ready:\n{podman.logs()}"
                time.sleep(1)
            yield {"podman": podman, "pg_url": pg_url, "api": api, "key": key, "ports": ports}
        finally:
            podman.remove_all()


def test_a_batch_through_the_api_runs_on_the_tier_containers_and_matches_the_offline_simulation(deployment, bench,
                                                                                                   tmp_path):
    d = deployment
    rows = load_dataset(bench / "rc-mmlu.jsonl.gz").split("test")[:N_ITEMS]
    example = (REPO / "ops" / "portfolio.example.toml").read_text()
    local = tmp_path / "portfolio.toml"  # the same portfolio, its data where this process sees it
    local.write_text(example.replace("../../shared/benchmarks", str(bench)))
    portfolio = load_portfolio(local)
    expected = {o.id: o for o in simulate(portfolio.built_policy, tiers_of(portfolio), rows)}
    assert len({o.final_tier for o in expected.values()}) >= 2  # the batch climbs tiers: messages cross containers

    body = "".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in rows).encode()
    started = time.monotonic()
    with httpx.Client(base_url=d["api"], timeout=60, headers={"Authorization": f"Bearer {d['key']}"}) as h:
        r = h.post("/v1/batches", content=body, headers={"Content-Type": "application/jsonl"})
        assert r.status_code == 202, r.text
        batch_id = r.json()["id"]
        deadline = time.monotonic() + 300
        while (b := h.get(f"/v1/batches/{batch_id}").json())["status"] != "completed":
            assert time.monotonic() < deadline, f"batch unfinished: {b}\n{d['podman'].logs()}"
            time.sleep(1)
        results = [json.loads(x) for x in h.get(f"/v1/batches/{batch_id}/results").text.splitlines()]
    print(f"\n{N_ITEMS} items through the containers in {time.monotonic() - started:.1f} s")
    assert b["cascade"]["counts"]["done"] == N_ITEMS and b["cascade"]["counts"]["open"] == 0

    # read back from PostgreSQL: every job, its attempts in order, as the simulation says
    engine = create_engine(d["pg_url"])
    try:
        with engine.connect() as c:
            db_jobs = c.execute(text("SELECT id, item_key, status, final_tier, final_answer, total_cost FROM jobs "
                                     "WHERE batch_id = :b ORDER BY seq"), {"b": batch_id}).mappings().all()
            calls: dict[str, list[str]] = {}
            for a in c.execute(text("SELECT a.job_id, a.tier, a.decision FROM attempts a JOIN jobs j ON j.id = a.job_id "
                                    "WHERE j.batch_id = :b ORDER BY a.job_id, a.step, a.id"), {"b": batch_id}):
                calls.setdefault(a.job_id, []).append(a.tier)
            batch = c.execute(text("SELECT total, done, succeeded, total_cost FROM batches WHERE id = :b"),
                              {"b": batch_id}).mappings().one()
    finally:
        engine.dispose()
    print("final tiers (PostgreSQL):", {t: sum(j["final_tier"] == t for j in db_jobs) for t in TIERS},
          f"cost {batch['total_cost']:.6f} USD")
    assert [j["item_key"] for j in db_jobs] == [r.id for r in rows]
    for j in db_jobs:
        o = expected[j["item_key"]]
        assert (j["status"], j["final_tier"], j["final_answer"]) == (o.status, o.final_tier, o.answer), j["item_key"]
        assert j["total_cost"] == pytest.approx(o.cost_usd, rel=1e-9, abs=1e-15)
        assert calls[j["id"]] == o.calls, j["item_key"]
    assert (batch["total"], batch["done"]) == (N_ITEMS, N_ITEMS)
    assert batch["succeeded"] == sum(o.status == "succeeded" for o in expected.values())
    assert batch["total_cost"] == pytest.approx(sum(o.cost_usd for o in expected.values()), rel=1e-9)
    # what the API returned is what PostgreSQL holds
    answers = {x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"] for x in results}
    assert answers == {j["item_key"]: j["final_answer"] for j in db_jobs if j["status"] == "succeeded"}


def test_each_role_passes_its_health_check_and_a_worker_fails_it_when_nothing_answers(deployment):
    p = deployment["podman"]
    for name in p.names:  # the image's HEALTHCHECK: the canary, /readyz, Flower's /healthcheck
        deadline = time.monotonic() + 90  # a container just started may not listen yet
        while (r := p("healthcheck", "run", name, check=False, timeout=60)).returncode != 0:
            assert time.monotonic() < deadline, f"{name}: {r.stdout}{r.stderr}\n{p.logs()}"
            time.sleep(2)
        assert r.stdout.strip() in ("", "healthy"), r.stdout
    worker = next(n for n in p.names if n.endswith(f"-{TIERS[0]}"))
    ok = p("exec", worker, "python", "/opt/cascade/healthcheck.py")
    assert f":{deployment['ports'][TIERS[0]]}/healthz: 200" in ok.stdout
    bad = p("exec", "-e", f"CASCADE_METRICS_PORT={free_port()}", worker, "python", "/opt/cascade/healthcheck.py",
            check=False)
    assert bad.returncode == 1 and "/healthz" in bad.stdout
    assert p("exec", worker, "id", "-u").stdout.strip() == "10001"


def test_flower_behind_basic_auth_lists_every_tier_worker(deployment):
    base = f"http://127.0.0.1:{deployment['ports']['flower']}"
    url = f"{base}/api/workers"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(f"{base}/healthcheck", timeout=30).text == "OK"  # the probe ops/k8s/ uses needs no credentials
    auth = {"Authorization": "Basic " + base64.b64encode(FLOWER_AUTH.encode()).decode()}
    deadline = time.monotonic() + 90
    while True:
        r = httpx.get(url, params={"refresh": "1"}, headers=auth, timeout=30)
        tiers = {name.split("@", 1)[0] for name in (r.json() if r.status_code == 200 else {})}
        if set(TIERS) <= tiers:
            break
        assert time.monotonic() < deadline, f"Flower lists {sorted(tiers)} ({r.status_code})\n{deployment['podman'].logs()}"
        time.sleep(2)
