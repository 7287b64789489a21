"""docker/compose.yaml started for real with podman-compose, and checked.

    python3 docker/podman/compose_check.py check   # build, up, check everything, down (`make compose-check`)
    python3 docker/podman/compose_check.py up      # build and start project "cascade", and leave it running
    python3 docker/podman/compose_check.py down    # stop and remove it, volumes included

The compose file runs with docker/compose.podman.yaml layered on it (Redis, PostgreSQL
and Prometheus from Debian's packages, host networking on ports of their own: see that
file). `up` builds the images (the project's with docker/build.sh, the others from
docker/podman/services/Dockerfile, all on the local bookworm base), then starts the
services in the order the file's depends_on says; this podman (4.3) cannot wait for a
health check (podman-compose skips `service_healthy` before podman 4.6, and without
systemd nothing runs the checks on a timer), so this script runs the checks itself and
starts the next group once they pass. `check` then asserts, printing each step:
the migration step exited 0; every service passes its health check; a batch submitted
through the API finishes, its jobs read back from the compose PostgreSQL; Flower,
behind its basic auth, lists every tier's worker in /api/workers; Prometheus scrapes
the three workers; a tier worker killed with SIGKILL is restarted by its restart
policy and then works another batch. Standard library only; passwords are made per
run. Exit 0 when every check passed.
"""
from __future__ import annotations

import base64
import gzip
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CASCADE_SHARED", REPO.parent / "shared"))
# `check` runs a project of its own (it removes it, volumes included, before and after)
PROJECT = os.environ.get("CASCADE_COMPOSE_PROJECT") or ("cascade-check" if sys.argv[1:2] in ([], ["check"]) else "cascade")
FILES = ["-f", "docker/compose.yaml", "-f", "docker/compose.podman.yaml"]
TIERS = ["small", "medium", "large"]
API, FLOWER, PROMETHEUS = "http://127.0.0.1:18000", "http://127.0.0.1:15555", "http://127.0.0.1:19090"
SERVICE_IMAGES = {t: f"localhost/cascade-{t}:bookworm" for t in ("redis", "postgres", "prometheus")}
LONG_RUNNING = ["redis", "postgres", "api", *[f"tier-{t}" for t in TIERS], "flower", "prometheus"]


def log(msg: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def podman_env() -> dict[str, str]:
    out = subprocess.run(["bash", "-c", "source docker/podman/env.sh && env -0"], cwd=REPO, check=True,
                         capture_output=True).stdout
    env = dict(kv.split("=", 1) for kv in out.decode().split("\0") if "=" in kv)
    if not all(k in env for k in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "FLOWER_BASIC_AUTH")):
        env.update(REDIS_PASSWORD=secrets.token_hex(16), POSTGRES_PASSWORD=secrets.token_hex(16),
                   FLOWER_BASIC_AUTH=f"ops:{secrets.token_hex(12)}")
    return env


ENV = podman_env()


def sh(*args: str, check: bool = True, timeout: float = 600, quiet: bool = False) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(args)} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    if not quiet and r.stdout.strip():
        print(r.stdout.rstrip()[-2000:], flush=True)
    return r


def podman_compose() -> list[str]:
    for candidate in (REPO / ".venv" / "bin" / "podman-compose", shutil.which("podman-compose")):
        if candidate and Path(candidate).exists():
            return [str(candidate)]
    raise SystemExit("podman-compose is not installed (bash ops/setup.sh installs it into .venv)")


def compose(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh(*podman_compose(), "-p", PROJECT, *FILES, *args, **kw)


def container(service: str) -> str:
    """The container of a service (podman-compose names them PROJECT_SERVICE_1)."""
    return f"{PROJECT}_{service}_1"


def inspect(service: str, fmt: str) -> str:
    return sh("podman", "inspect", "--format", fmt, container(service), check=False, quiet=True).stdout.strip()


def healthy(service: str, timeout: float = 180) -> None:
    """Run the service's health check (no systemd timer runs it here) until it passes."""
    deadline = time.monotonic() + timeout
    if inspect(service, "{{.Config.Healthcheck}}") in ("", "<nil>"):  # none defined (Prometheus): running
        while inspect(service, "{{.State.Status}}") != "running":
            assert time.monotonic() < deadline, f"{service}: {inspect(service, '{{.State.Status}}')}"
            time.sleep(1)
        return
    while True:
        r = sh("podman", "healthcheck", "run", container(service), check=False, quiet=True, timeout=60)
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            logs = sh("podman", "logs", "--tail", "30", container(service), check=False, quiet=True)
            raise SystemExit(f"FAILED: {service} never passed its health check: {r.stdout}{r.stderr}\n"
                             f"{logs.stdout}{logs.stderr}")
        time.sleep(2)


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def build() -> None:
    started = time.monotonic()
    base = sh("bash", "docker/podman/base.sh", quiet=True).stdout.strip().splitlines()[-1]
    sh("bash", "docker/build.sh", timeout=1800, quiet=True)
    for target, image in SERVICE_IMAGES.items():
        sh("podman", "build", "--format", "docker", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
           "--target", target, "-t", image, "-f", "docker/podman/services/Dockerfile", "docker/podman/services",
           timeout=1800, quiet=True)
    log(f"images built or found in {time.monotonic() - started:.0f} s: cascade-router, "
        + ", ".join(SERVICE_IMAGES.values()))


def up() -> None:
    if not (SHARED / "benchmarks" / "rc-mmlu.jsonl.gz").exists():
        raise SystemExit(f"the shared benchmarks are missing at {SHARED} (set CASCADE_SHARED)")
    build()
    started = time.monotonic()
    # The order docker/compose.yaml's depends_on gives, each step waited for here: --no-deps,
    # because podman-compose turns depends_on into `podman run --requires`, and this podman
    # (4.3) then cannot start (or restart) a container whose requirement requires another.
    compose("up", "-d", "--no-build", "--no-deps", "redis", "postgres", quiet=True)
    healthy("redis")
    healthy("postgres")
    compose("up", "-d", "--no-build", "--no-deps", "migrate", quiet=True)
    sh("podman", "wait", container("migrate"), quiet=True, timeout=300)
    code = inspect("migrate", "{{.State.ExitCode}} {{.State.Status}}")
    assert code.startswith("0 "), f"the migration step: {code}\n" + sh(
        "podman", "logs", container("migrate"), check=False, quiet=True).stderr
    out = sh("podman", "logs", container("migrate"), quiet=True)
    log(f"migration step exited 0: {(out.stdout + out.stderr).strip()[-300:]}")
    compose("up", "-d", "--no-build", "--no-deps", *LONG_RUNNING[2:], quiet=True)
    for s in LONG_RUNNING:
        healthy(s)
    log(f"every service up and passing its health check in {time.monotonic() - started:.0f} s: "
        + ", ".join(LONG_RUNNING))


def psql(sql: str) -> str:
    return sh("podman", "exec", container("postgres"), "psql", "-h", "/tmp", "-p", "15432", "-U", "cascade",
              "-d", "cascade", "-tAF", "|", "-c", sql, quiet=True).stdout.strip()


def batch(key: str, n: int, offset: int = 0) -> str:
    rows = []
    with gzip.open(SHARED / "benchmarks" / "rc-mmlu.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == "test":
                rows.append({"id": r["id"], "prompt": r["prompt"]})
                if len(rows) == offset + n:
                    break
    body = "".join(json.dumps(r) + "\n" for r in rows[offset:]).encode()
    auth = {"Authorization": f"Bearer {key}"}
    status, out = http("POST", f"{API}/v1/batches", body, {**auth, "Content-Type": "application/jsonl"})
    assert status == 202, (status, out)
    batch_id = json.loads(out)["id"]
    started, deadline = time.monotonic(), time.monotonic() + 300
    while (b := json.loads(http("GET", f"{API}/v1/batches/{batch_id}", headers=auth)[1]))["status"] != "completed":
        assert time.monotonic() < deadline, f"batch {batch_id} unfinished after 300 s: {b}"
        time.sleep(1)
    counts = b["cascade"]["counts"]  # the project's own counts, beside OpenAI's request_counts
    assert counts["done"] == n and counts["open"] == 0 and b["request_counts"]["total"] == n, b
    rows_db = psql(f"SELECT status, final_tier, count(*), round(sum(total_cost)::numeric, 6) FROM jobs "
                   f"WHERE batch_id = '{batch_id}' GROUP BY 1, 2 ORDER BY 2")
    total = sum(int(line.split("|")[2]) for line in rows_db.splitlines())
    assert total == n, rows_db
    log(f"batch {batch_id}: {n} items finished in {time.monotonic() - started:.1f} s; in PostgreSQL "
        f"(status|final tier|jobs|cost USD): {'; '.join(rows_db.splitlines())}")
    return batch_id


def check() -> None:
    up()
    key = sh("podman", "exec", container("api"), "cascade", "keys", "create", "--tenant", "compose-check",
             quiet=True).stdout.strip().splitlines()[-1]
    batch(key, 40)

    user_pass = ENV["FLOWER_BASIC_AUTH"]
    assert http("GET", f"{FLOWER}/api/workers")[0] == 401
    auth = {"Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}
    deadline = time.monotonic() + 90
    while True:
        status, out = http("GET", f"{FLOWER}/api/workers?refresh=1", headers=auth)
        workers = sorted(json.loads(out)) if status == 200 else []
        if {w.split("@")[0] for w in workers} >= set(TIERS):
            break
        assert time.monotonic() < deadline, f"Flower lists {workers} ({status})"
        time.sleep(2)
    log(f"Flower (basic auth; 401 without) lists the workers: {', '.join(workers)}")

    deadline = time.monotonic() + 90
    while True:
        targets = json.loads(http("GET", f"{PROMETHEUS}/api/v1/targets")[1])["data"]["activeTargets"]
        up_ = sorted(t["labels"]["instance"] for t in targets if t["health"] == "up")
        if len(up_) == len(TIERS):
            break
        assert time.monotonic() < deadline, f"Prometheus targets: {[(t['labels'], t['health']) for t in targets]}"
        time.sleep(3)
    log(f"Prometheus scrapes the workers: {', '.join(up_)} up")

    victim = "tier-medium"
    before = inspect(victim, "{{.RestartCount}}")
    pid = inspect(victim, "{{.State.Pid}}")
    os.kill(int(pid), 9)
    log(f"SIGKILL to {victim}'s process (host pid {pid}); restarts so far: {before}")
    deadline = time.monotonic() + 120
    while not (inspect(victim, "{{.RestartCount}}") != before and inspect(victim, "{{.State.Running}}") == "true"):
        assert time.monotonic() < deadline, f"{victim} was not restarted: {inspect(victim, '{{.State.Status}}')}"
        time.sleep(1)
    healthy(victim)
    log(f"{victim} restarted by its restart policy ({inspect(victim, '{{.HostConfig.RestartPolicy.Name}}')}), "
        f"restart count {inspect(victim, '{{.RestartCount}}')}, healthy again")
    batch(key, 40, offset=40)
    log("every check passed")


def down() -> None:
    compose("down", "-v", "-t", "20", check=False, quiet=True, timeout=900)
    left = sh("podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}", "--format",
              "{{.Names}}", quiet=True).stdout.split()
    if left:
        sh("podman", "rm", "-f", *left, check=False, quiet=True)
    log(f"compose project {PROJECT} removed")


def main() -> int:
    what = sys.argv[1] if len(sys.argv) > 1 else "check"
    if what == "up":
        up()
    elif what == "down":
        down()
    elif what == "check":
        started = time.monotonic()
        down()
        try:
            check()
        finally:
            if os.environ.get("CASCADE_COMPOSE_KEEP") != "1":
                down()
        log(f"compose check done in {time.monotonic() - started:.0f} s")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
