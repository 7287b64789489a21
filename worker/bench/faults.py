"""Fault injection: the whole pipeline against its own Redis and PostgreSQL.

`cascade bench faults` (and tests/pipeline/test_faults.py, with shorter outages)
starts a private Redis (append-only file on, an ACL user with a password) and a
private PostgreSQL (password authentication) on spare ports, never the machine's
own; a fake OpenAI-style model server in this process that counts every request;
and per scenario a fresh database, one `cascade worker` process per tier (threads
pool, several threads) kept running by a supervisor as `restart: unless-stopped`
would, and the real submitter, `cascade run`. Credentials reach the processes as
${NAME} references expanded from a secrets file.

A scenario injects its fault mid-batch and waits, with no human step, until every
job is final or its time is up, then reconciles the database with the model
server: submitted, finished, lost (never finished), duplicated (a job with two
final results, counters or costs that disagree with the attempts and the lost
calls' estimates), and from the model calls recorded (model_calls) against the
requests the model server counted: duplicate_model_calls (a job called twice at
one tier: only after its first holder's lease expired), calls_started_not_finished
with their estimated spend (est_unfinished_usd: in the jobs' costs), and
unrecorded_calls (requests the model server answered that no call row records:
spend missing from the books).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import redis

from worker.config.credentials import redact_text
from worker.models.preflight import PROBE_PROMPT
from worker.ops.migrate import upgrade
from worker.ops.procs import stop_all
from worker.store.admin import create_database
from worker.store.batches import BatchStore
from worker.store.engine import dispose_all
from worker.store.jobs import JobStore

REPO = Path(__file__).resolve().parents[2]
TIERS = ("t0", "t1", "t2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or ([shutil.which(name)] if shutil.which(name) else [])
    if not found:
        raise RuntimeError(f"{name} not found (PostgreSQL server binaries are needed for the fault suite)")
    return found[-1]


def _wait(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if cond():
                return
        time.sleep(step)
    raise RuntimeError(f"{what} not within {timeout:.0f}s")


class OwnRedis:
    """A private redis-server: append-only file, the `default` user off, an ACL user."""

    def __init__(self, root: Path, password: str):
        self.dir = root / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
                "--user", "default", "off", "--user", "cascade", "on", f">{self.password}", "~*", "&*", "+@all"]
        self.proc = subprocess.Popen(args, stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        _wait(lambda: self.client().ping(), 20, "redis-server answering")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, username="cascade", password=self.password,
                           socket_timeout=2)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)
        self.proc = None

    def wipe(self) -> None:
        """Its data gone, as after a restart without persistence."""
        for p in self.dir.iterdir():
            if p.name != "redis.log":
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def _unprivileged(cmd: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root: as root, run its tools as the postgres user
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


class OwnPostgres:
    """A private PostgreSQL cluster (scram-sha-256 passwords) on a spare port."""

    def __init__(self, password: str):
        # its own folder under the system's temp dir: as root, the postgres user must
        # reach it, and a caller's folder (pytest's) may be closed to other users
        self.home = Path(tempfile.mkdtemp(prefix="cascade-faults-pg-"))
        self.dir = self.home / "data"
        self.port = free_port()
        self.password = password
        pwfile = self.home / "pw.txt"
        pwfile.write_text(password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.home, "postgres")
            shutil.chown(pwfile, "postgres")
        self.log = self.home / "postgres.log"
        self._run(_pg_bin("initdb"), "-D", str(self.dir), "-U", "postgres", "-A", "scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")
        pwfile.unlink()

    def _run(self, *cmd: str, check: bool = True) -> None:
        p = subprocess.run(_unprivileged(list(cmd)), capture_output=True, text=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {p.stderr.strip()[-500:]}")

    def start(self, *settings: str) -> None:
        """settings: more `name=value` server settings."""
        opts = f"-p {self.port} -k {self.home} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        opts += "".join(f" -c {s}" for s in settings)
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-l", str(self.log), "-o", opts, "-w", "start")

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "fast", "-w", "stop", check=False)

    def crash(self) -> None:
        """Stop as a crash does: no checkpoint, what the log had not flushed is gone at restart."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)

    def url(self, db: str, password: str | None = None) -> str:
        return f"postgresql+psycopg://postgres:{password or self.password}@127.0.0.1:{self.port}/{db}"

    def create_db(self, name: str) -> None:
        create_database(self.url("postgres"), name, replace=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # every worker thread may connect at once: a refused connection would be a try
    # the attempts count and the server never saw
    request_queue_size = 256


class FakeModels:
    """An OpenAI-style chat server for models m0, m1, m2: a fixed latency, a confidence
    (token log-prob) derived from the prompt, usage for the cost; a model can be set to
    hang or to answer 503. Every request is counted, per model, as it arrives, but the
    workers' start-up probes (the signal preflight's PROBE_PROMPT)."""

    def __init__(self, key: str, latency: float = 0.05, host: str = "127.0.0.1"):
        self.key = key
        self.host = host
        self.latency = latency
        self.mode: dict[str, str] = {}
        self.requests: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                model = body.get("model", "")
                probe = (body.get("messages") or [{}])[-1].get("content") == PROBE_PROMPT
                if not probe:  # a worker's start-up probe (worker.models.preflight) is no job's call
                    with outer._lock:
                        outer.requests[model] = outer.requests.get(model, 0) + 1
                        outer.in_flight[model] = outer.in_flight.get(model, 0) + 1
                try:
                    status, payload = outer.answer(model, body, self.headers.get("Authorization"))
                finally:
                    if not probe:
                        with outer._lock:
                            outer.in_flight[model] -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its read timeout)

        self.server = _Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, model: str, body: dict, auth: str | None) -> tuple[int, bytes]:
        if auth != f"Bearer {self.key}":
            return 401, b'{"error": {"message": "bad key"}}'
        mode = self.mode.get(model, "ok")
        if mode == "hang":
            time.sleep(30)
            return 504, b"{}"
        time.sleep(self.latency)
        if mode == "5xx":
            return 503, b'{"error": {"message": "overloaded (fault injection)"}}'
        prompt = body["messages"][-1]["content"]
        h = int(hashlib.sha256(f"{model}\n{prompt}".encode()).hexdigest()[:8], 16)
        lp = -0.05 if h % 2 else -2.0
        content, completion = f"answer of {model}", 2
        if "POISON-NUL" in prompt:
            content = "bad\u0000answer"
        if "POISON-HUGE" in prompt:
            completion = 10**12  # beyond an INTEGER column: the attempt cannot be stored as it is
        return 200, json.dumps({
            "model": model,
            "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                         "logprobs": {"content": [{"token": "x", "logprob": lp, "top_logprobs": []}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": completion},
        }).encode()

    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def busy(self, model: str) -> int:
        with self._lock:
            return self.in_flight.get(model, 0)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.in_flight.clear()
            self.mode.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def portfolio_text(port: int, host: str = "127.0.0.1") -> str:
    parts = ['[policy]\nname = "threshold"\nsignal = "mean_logprob"\n\n[policy.thresholds]\nt0 = -1.0\nt1 = -1.0\n']
    for i, t in enumerate(TIERS):
        parts.append(
            f'[[tiers]]\nname = "{t}"\n'
            f'backend = {{ kind = "openai", model = "m{i}", base_url = "http://{host}:{port}/v1", '
            f'api_key_env = "FAULTS_MODEL_KEY", read_timeout = 2, connect_timeout = 1 }}\n'
            f'price = {{ input_per_mtok = {10 ** i}, output_per_mtok = {2 * 10 ** i} }}\n')
    return "\n".join(parts)


@dataclass
class FaultConfig:
    jobs: int = 300
    threads: int = 4  # per tier worker process (the threads pool)
    chunk: int = 4
    latency: float = 0.05
    outage_short: float = 20.0
    outage_long: float = 180.0
    budget: float = 120.0  # seconds allowed beyond the outage itself
    env: dict[str, str] = field(default_factory=dict)  # extra CASCADE_* settings (tests shorten stale_after)
    log: Callable[[str], None] = print


class Lab:
    """The private services, the model server and the secrets file, for every scenario."""

    def __init__(self, root: Path, cfg: FaultConfig):
        self.root, self.cfg = root, cfg
        self.secrets = {"FAULTS_REDIS_PASSWORD": secrets.token_hex(12), "FAULTS_PG_PASSWORD": secrets.token_hex(12),
                        "FAULTS_MODEL_KEY": secrets.token_hex(12)}
        (root / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in self.secrets.items()))
        (root / "secrets.env").chmod(0o600)
        self.redis = OwnRedis(root, self.secrets["FAULTS_REDIS_PASSWORD"])
        self.pg = OwnPostgres(self.secrets["FAULTS_PG_PASSWORD"])
        self.models = FakeModels(self.secrets["FAULTS_MODEL_KEY"], cfg.latency)
        self.portfolio = root / "portfolio.toml"
        self.portfolio.write_text(portfolio_text(self.models.port))

    def __enter__(self) -> "Lab":
        self.redis.start()
        self.pg.start()
        return self

    def __exit__(self, *exc) -> None:
        dispose_all()
        self.redis.stop(signal.SIGKILL)
        self.pg.remove()
        self.models.close()

    def env(self, db: str, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_") and k not in self.secrets}
        env.update({
            "CASCADE_SECRETS_FILE": str(self.root / "secrets.env"),
            "CASCADE_BROKER_URL": f"redis://cascade:${{FAULTS_REDIS_PASSWORD}}@127.0.0.1:{self.redis.port}/0",
            "CASCADE_DATABASE_URL": self.pg.url(db, "${FAULTS_PG_PASSWORD}"),
            "CASCADE_HOME": str(home), "CASCADE_CHUNK_SIZE": str(self.cfg.chunk),
            "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **self.cfg.env,
        })
        return env


class Run:
    """One scenario's deployment: a fresh database, tier workers under a supervisor
    that restarts any that exits, and the submitter."""

    def __init__(self, lab: Lab, name: str):
        self.lab, self.name = lab, name
        self.dir = lab.root / name
        self.dir.mkdir()
        self.db = f"faults_{name}"
        lab.pg.create_db(self.db)
        self.url = lab.pg.url(self.db)
        upgrade(self.url)
        self.jobs, self.batches = JobStore(self.url), BatchStore(self.url)
        lab.redis.client().flushall()
        lab.models.reset()
        self.env = lab.env(self.db, self.dir / "home")
        self.workers: dict[str, subprocess.Popen] = {}
        self.exits: list[str] = []  # tier workers that exited without being told to (then restarted)
        self.hold: set[str] = set()  # tiers the scenario stopped on purpose, restarted by it
        self._stop = threading.Event()
        self._n = 0
        self.input = self.dir / "input.jsonl"
        self.submitters: list[subprocess.Popen] = []
        self.logs: dict[str, Path] = {}  # the latest log file of each process name

    def spawn(self, args: list[str], log: str) -> subprocess.Popen:
        self._n += 1
        self.logs[log] = self.dir / f"{log}-{self._n}.log"
        out = open(self.logs[log], "wb")
        return subprocess.Popen([sys.executable, "-m", "worker.cli", *args], env=self.env, cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)

    def start_worker(self, tier: str) -> None:
        self.workers[tier] = self.spawn(["worker", "--tier", tier, "--portfolio", str(self.lab.portfolio),
                                         "--pool", "threads", "-c", str(self.lab.cfg.threads), "-l", "WARNING"],
                                        f"worker-{tier}")

    def _supervise(self) -> None:
        while not self._stop.wait(1.0):
            for tier, p in list(self.workers.items()):
                if p.poll() is not None and tier not in self.hold:
                    self.exits.append(f"{tier}: exit {p.returncode}")
                    self.start_worker(tier)

    def __enter__(self) -> "Run":
        for t in TIERS:
            self.start_worker(t)
        threading.Thread(target=self._supervise, daemon=True).start()
        self.wait_started()
        return self

    def wait_started(self, timeout: float = 120.0) -> None:
        """Until every tier worker passed its start-up probe of the model server (it then names
        its queues), so a scenario's fault on a model starts with the workers serving."""
        deadline = time.monotonic() + timeout
        for t in TIERS:
            while f"tier {t}: queues".encode() not in self.logs[f"worker-{t}"].read_bytes():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {t} worker did not start within {timeout:g}s")
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        stop_all(list(self.workers.values()) + self.submitters)
        dispose_all()

    def kill_worker(self, tier: str, sig: int) -> None:
        self.workers[tier].send_signal(sig)  # the supervisor starts a new one, as a restart policy would

    def write_input(self, lines: list[str]) -> None:
        self.input.write_text("".join(line + "\n" for line in lines))

    def submit(self) -> subprocess.Popen:
        p = self.spawn(["run", str(self.input), "--portfolio", str(self.lab.portfolio), "--batch", self.name,
                        "--quiet", "--out", str(self.dir / "results.jsonl")], "submitter")
        self.submitters.append(p)
        return p

    # -- reading the outcome ------------------------------------------------------
    def progress(self) -> tuple[int, int]:
        """(finished jobs, attempts) so far."""
        return self.jobs.final_count(self.name), self.jobs.attempt_count()

    def tier_attempts(self, tier: str) -> int:
        return self.jobs.attempt_count(tier)

    def wait_done(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.progress()[0] >= n:
                    return True
            time.sleep(0.5)
        return False

    def reconcile(self, submitted: int) -> dict:
        rows, ats = self.jobs.ledger(self.name)
        b = self.batches.batch(self.name)
        final = [r for r in rows if r.status in ("succeeded", "failed", "cancelled")]
        finals_per_job: dict[str, int] = {}
        cost_per_job: dict[str, list[float]] = {}
        for a in ats:
            if a.decision in ("accept", "reject"):
                finals_per_job[a.job_id] = finals_per_job.get(a.job_id, 0) + 1
            cost_per_job.setdefault(a.job_id, []).append(a.cost_usd)
        calls = self.jobs.calls()
        for c in calls:  # a call lost on the way is in its job's cost at its estimate
            if c.state in ("lost", "late"):
                cost_per_job.setdefault(c.job_id, []).append(c.est_cost_usd)
        two_finals = sum(1 for v in finals_per_job.values() if v > 1)
        bad_cost = sum(1 for r in final if r.status != "cancelled"
                       and not math.isclose(r.total_cost, math.fsum(cost_per_job.get(r.id, [])), rel_tol=1e-9,
                                            abs_tol=1e-15))
        counters_off = 0
        if b is not None:
            counters_off = abs(b["done"] - len(final)) + abs(b["total"] - len(rows))
            if not math.isclose(b["total_cost"], math.fsum(r.total_cost for r in final), rel_tol=1e-9, abs_tol=1e-12):
                counters_off += 1
        return {
            "submitted": submitted, "finished": len(final), "lost": submitted - len(final),
            "duplicated": two_finals + bad_cost + counters_off,
            **call_accounts(calls, self.lab.models.total()),
        }


def _hms(t) -> str:
    return "" if t is None else t.strftime("%H:%M:%S.%f")[:-3]


def call_accounts(calls: list, requests: int) -> dict:
    """The model calls recorded (JobStore.calls) against the requests the model server
    answered: a call finished made `tries` requests; one started and never finished
    (its worker killed or cut off), one at least."""
    made: dict[tuple[str, str], int] = {}
    rows: dict[tuple[str, str], list] = {}
    unfinished = [c for c in calls if c.state in ("started", "lost")]
    for c in calls:
        if c.state in ("started", "lost") or (c.tries or 0) > 0:
            made[(c.job_id, c.tier)] = made.get((c.job_id, c.tier), 0) + 1
            rows.setdefault((c.job_id, c.tier), []).append(f"{c.holder}:{c.state}:{c.tries}:{_hms(c.started_at)}-"
                                                           f"{_hms(c.finished_at)}")
    recorded = sum(int(c.tries or 0) for c in calls if c.state in ("finished", "late")) + len(unfinished)
    # started rows whose request never left (the worker died between the record and the send,
    # or the record's reply was lost and its stage tried again): the model server says how many
    never_sent = max(0, recorded - requests)
    return {
        "model_calls": len(calls),
        # a job called twice at one tier, less the started rows that never reached the server
        "duplicate_model_calls": max(0, sum(n - 1 for n in made.values()) - never_sent),
        # a few of them, each call as holder:state:tries:started-finished, to tell a lease that expired from a bug
        "duplicates_seen": dict([(f"{j}@{t}", rows[(j, t)]) for (j, t), n in made.items() if n > 1][:5]),
        "calls_started_not_finished": len(unfinished),
        "est_unfinished_usd": round(math.fsum(c.est_cost_usd for c in unfinished), 9),
        "late_calls": sum(1 for c in calls if c.state == "late"),
        "unrecorded_calls": max(0, requests - recorded),
        "unfinished_never_sent": never_sent,
    }


# -- the scenarios ------------------------------------------------------------------
# Each gets the run and the config, starts the submitter, injects its fault
# mid-batch, and returns the seconds of outage it imposed (0 for none).

def _lines(cfg: FaultConfig, extra: list[str] = ()) -> list[str]:
    return [json.dumps({"id": f"q{i}", "prompt": f"question {i}: what is {i} + {i}?"}) for i in range(cfg.jobs)] + list(extra)


def _after(run: Run, tier: str, n: int, timeout: float = 120) -> None:
    _wait(lambda: run.tier_attempts(tier) >= n, timeout, f"{n} attempts at {tier}", step=0.05)


def _worker_signal(tier: str, sig: int):
    def scenario(run: Run, cfg: FaultConfig) -> float:
        run.write_input(_lines(cfg))
        run.submit()
        _after(run, tier, 8)
        model = f"m{TIERS.index(tier)}"  # the signal lands while the tier has calls in flight
        _wait(lambda: run.lab.models.busy(model) > 0, 60, f"a call in flight at {tier}", step=0.002)
        run.kill_worker(tier, sig)
        return 0.0
    return scenario


def _redis(kind: str):
    def scenario(run: Run, cfg: FaultConfig) -> float:
        run.write_input(_lines(cfg))
        run.submit()
        _after(run, "t0", cfg.jobs // 5)
        red = run.lab.redis
        red.stop(signal.SIGTERM if kind == "restart" else signal.SIGKILL)
        if kind == "empty":
            red.wipe()
        time.sleep(2.0)
        red.start()
        return 2.0
    return scenario


def _postgres(seconds_of: Callable[[FaultConfig], float]):
    def scenario(run: Run, cfg: FaultConfig) -> float:
        run.write_input(_lines(cfg))
        run.submit()
        _after(run, "t0", cfg.jobs // 5)
        run.lab.pg.stop()
        outage = seconds_of(cfg)
        time.sleep(outage)
        run.lab.pg.start()
        return outage
    return scenario


def _backend(mode: str):
    def scenario(run: Run, cfg: FaultConfig) -> float:
        run.lab.models.mode["m1"] = mode  # the middle tier hangs / answers 503 from the start
        run.write_input(_lines(cfg))
        run.submit()
        return 0.0
    return scenario


def _poison(run: Run, cfg: FaultConfig) -> float:
    extra = [json.dumps({"id": "poison-nul", "prompt": "POISON-NUL answer"}),
             json.dumps({"id": "poison-huge", "prompt": "POISON-HUGE usage"}),
             json.dumps({"id": "nul-in-prompt", "prompt": "a\u0000b"}),
             '{"id": "nan", "prompt": "x", "w": NaN}',
             "{not json"]
    run.write_input(_lines(cfg, extra))
    run.submit()
    return 0.0


def _submitter_kill(run: Run, cfg: FaultConfig) -> float:
    run.write_input(_lines(cfg))
    first = run.submit()
    _wait(lambda: run.batches.batch_count() > 0, 60, "the batch row", step=0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    run.submit()  # the same command again: it resumes the batch
    return 0.0


def _baseline(run: Run, cfg: FaultConfig) -> float:
    run.write_input(_lines(cfg))
    run.submit()
    return 0.0


SCENARIOS: dict[str, Callable[[Run, FaultConfig], float]] = {
    "baseline": _baseline,  # no fault: the time a batch takes here, for comparison
    **{f"worker_kill9_{t}": _worker_signal(t, signal.SIGKILL) for t in TIERS},
    **{f"worker_sigterm_{t}": _worker_signal(t, signal.SIGTERM) for t in TIERS},
    "redis_restart_aof": _redis("restart"),
    "redis_kill9_aof": _redis("kill"),
    "redis_kill9_empty": _redis("empty"),
    "postgres_stop_short": _postgres(lambda c: c.outage_short),
    "postgres_stop_long": _postgres(lambda c: c.outage_long),
    "backend_hang": _backend("hang"),
    "backend_5xx": _backend("5xx"),
    "poison_item": _poison,
    "submitter_kill9": _submitter_kill,
}
EXTRA_LINES = {"poison_item": 5}


def run_scenario(lab: Lab, name: str, scenarios: dict | None = None, run_cls: type | None = None) -> dict:
    cfg = lab.cfg
    submitted = cfg.jobs + EXTRA_LINES.get(name, 0)
    with (run_cls or Run)(lab, name) as run:
        t0 = time.monotonic()
        outage = (scenarios or SCENARIOS)[name](run, cfg)
        fault_over = time.monotonic()
        run.wait_done(submitted, cfg.budget)  # the budget runs from the end of the fault
        done = time.monotonic()
        time.sleep(1.0)  # late duplicates, if any, land before the count
        settle = run.settle(cfg.budget) if hasattr(run, "settle") else None
        result = run.reconcile(submitted)
        if settle is not None:
            result.update(settle)
        result.update(seconds=round(done - t0, 1), after_fault_s=round(done - fault_over, 1),
                      outage_s=round(outage, 1), worker_restarts=len(run.exits))
        if hasattr(run, "operator_saw"):
            result.update(run.extra_result(cfg.budget))
            result["operator_saw"] = run.operator_saw()
        sub = run.submitters[-1]
        with contextlib.suppress(subprocess.TimeoutExpired):
            sub.wait(30)
        result["submitter_exit"] = sub.poll()
    cfg.log(f"{name}: {json.dumps(result)}")
    return result


def run_faults(cfg: FaultConfig, names: list[str] | None = None, root: Path | None = None) -> dict:
    names = names or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown fault scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
    root = root or Path(tempfile.mkdtemp(prefix="cascade-faults-"))
    with Lab(root, cfg) as lab:
        return {"faults": run_each(names, lambda name: run_scenario(lab, name), cfg.log)}


def run_each(names: list[str], run: Callable[[str], dict], log: Callable[[str], None]) -> dict[str, dict]:
    """Each scenario's result by name; a harness failure is reported for its scenario and
    the others still run."""
    out: dict[str, dict] = {}
    for name in names:
        try:
            out[name] = run(name)
        except Exception as e:
            log(f"{name}: harness error: {redact_text(str(e))}")
            out[name] = {"error": redact_text(f"{type(e).__name__}: {e}")}
    return out

