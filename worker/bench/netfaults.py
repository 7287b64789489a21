"""Faults between machines: `cascade bench faults --network`.

The drill of worker/bench/faults.py, but every part on a host of its own: Linux
network namespaces this creates (root needed), each joined by a veth link to one
bridge in the drill's own namespace, which holds the fault proxies and the fake model
server:

    redis  10.77.N.10   redis-server                      <- proxy :6379 on the bridge
    pg     10.77.N.11   PostgreSQL (a private cluster)    <- proxy :5432 on the bridge
    t0 t1 t1b t2  .20-  one tier worker each (t1 has two: one sweeps for the other)
    api    10.77.N.30   the submitter (`cascade run`) and the task API (`cascade serve`)
    bridge 10.77.N.1    fault proxies (worker/bench/netproxy.py), the model server

Every client reaches Redis and PostgreSQL through the proxies (latency, loss, resets);
one path is cut alone by an iptables DROP in the client's namespace (packets vanish:
open connections hang as in a real partition, they are not refused); a whole host
goes by taking its link down. Model calls go straight to the model server, so a
worker cut from Redis or PostgreSQL keeps calling models. Everything (processes in
the namespaces, the namespaces, the links) is removed on the way out, on failure too.

The sweeper's idle time is 15 s here (STALE_AFTER, default 60 s) so that a partition
longer than it (re-send, lease expired) fits in a drill.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import httpx
import redis

from worker.bench.faults import (
    REPO,
    TIERS,
    FakeModels,
    FaultConfig,
    Lab,
    OwnPostgres,
    OwnRedis,
    Run,
    _after,
    _lines,
    _pg_bin,
    _wait,
    portfolio_text,
    run_each,
    run_scenario,
)
from worker.bench.netproxy import FaultProxy
from worker.config.settings import Settings
from worker.service.tenants import Tenants
from worker.store.tenants import TenantStore

STALE_AFTER = 15.0
MODEL_LATENCY = 0.2
WORKERS = {"t0": "t0", "t1": "t1", "t1b": "t1", "t2": "t2"}  # worker host -> its tier
HOSTS = {"redis": 10, "pg": 11, "t0": 20, "t1": 21, "t1b": 22, "t2": 23, "t2new": 24, "api": 30}
REDIS_PORT, PG_PORT = 6379, 5432


class NetworkUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no `ip`, no iptables)."""


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()[-300:]}")
    return p


def network_unavailable() -> str | None:
    """Why the drill cannot run here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, as CI does)"
    for tool in ("ip", "iptables", "redis-server"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    probe = f"cfprobe{os.getpid()}"
    p = _sh("ip", "netns", "add", probe, check=False)
    if p.returncode != 0:
        return f"cannot create a network namespace: {p.stderr.strip()[-200:]}"
    try:
        p = _sh("ip", "netns", "exec", probe, "iptables", "-S", check=False)
        if p.returncode != 0:
            return f"iptables does not work in a namespace: {p.stderr.strip()[-200:]}"
    finally:
        _sh("ip", "netns", "del", probe, check=False)
    return None


class Net:
    """The namespaces, the bridge and the veth links; cuts and heals paths."""

    def __init__(self):
        self.tag = f"{os.getpid() % 10000:04d}"
        self.subnet = 100 + os.getpid() % 100  # 10.77.<subnet>.0/24
        self.bridge = f"cfb{self.tag}"
        self.hosts: dict[str, str] = {}  # host name -> namespace
        self.rules: list[tuple[str, list[str]]] = []
        atexit.register(self.down)

    def ip(self, host: str) -> str:
        return f"10.77.{self.subnet}.{1 if host == 'bridge' else HOSTS[host]}"

    def up(self) -> "Net":
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.ip('bridge')}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        return self

    def add(self, host: str) -> str:
        ns = f"cf{self.tag}-{host}"
        veth, peer = f"cfv{self.tag}{HOSTS[host]}", f"cfp{self.tag}{HOSTS[host]}"
        _sh("ip", "netns", "add", ns)
        self.hosts[host] = ns
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
        _sh("ip", "link", "set", peer, "netns", ns)
        _sh("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", peer)
        _sh("ip", "-n", ns, "link", "set", peer, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "set", veth, "master", self.bridge)
        _sh("ip", "link", "set", veth, "up")
        return ns

    def exec(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host]]

    def cut(self, host: str, port: int) -> None:
        """Packets between `host` and the service on the bridge's `port` vanish, both ways."""
        for rule in (["OUTPUT", "-d", self.ip("bridge"), "-p", "tcp", "--dport", str(port), "-j", "DROP"],
                     ["INPUT", "-s", self.ip("bridge"), "-p", "tcp", "--sport", str(port), "-j", "DROP"]):
            _sh(*self.exec(host), "iptables", "-I", *rule)
            self.rules.append((host, rule))

    def heal(self, host: str | None = None) -> None:
        keep = []
        for h, rule in self.rules:
            if host is None or h == host:
                _sh(*self.exec(h), "iptables", "-D", *rule, check=False)
            else:
                keep.append((h, rule))
        self.rules = keep

    def link(self, host: str, up: bool) -> None:
        _sh("ip", "link", "set", f"cfv{self.tag}{HOSTS[host]}", "up" if up else "down")

    def kill_all(self, host: str) -> None:
        """SIGKILL every process in the host's namespace (all started by this drill)."""
        ns = self.hosts.get(host)
        if ns is None:
            return
        for pid in _sh("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)

    def down(self) -> None:
        for host in list(self.hosts):
            self.kill_all(host)
        time.sleep(0.2)
        for host, ns in list(self.hosts.items()):
            _sh("ip", "netns", "del", ns, check=False)
            self.hosts.pop(host)
        _sh("ip", "link", "del", self.bridge, check=False)


class NetRedis(OwnRedis):
    def __init__(self, root: Path, password: str, net: Net):
        super().__init__(root, password)
        self.net, self.port = net, REDIS_PORT

    def start(self) -> None:
        args = [*self.net.exec("redis"), "redis-server", "--port", str(self.port), "--bind", self.net.ip("redis"),
                "--dir", str(self.dir), "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
                "--user", "default", "off", "--user", "cascade", "on", f">{self.password}", "~*", "&*", "+@all"]
        self.proc = subprocess.Popen(args, stdout=open(self.dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        _wait(lambda: self.client().ping(), 20, "redis-server answering")

    def client(self) -> redis.Redis:  # the drill's own access: straight to the host, never through a fault
        return redis.Redis(host=self.net.ip("redis"), port=self.port, username="cascade", password=self.password,
                           socket_timeout=5)


class NetPostgres(OwnPostgres):
    def __init__(self, password: str, net: Net):
        self.net = net  # before initdb (OwnPostgres.__init__ runs it through _run)
        super().__init__(password)
        self.port = PG_PORT
        with open(self.dir / "pg_hba.conf", "a") as f:
            f.write(f"host all all 10.77.{net.subnet}.0/24 scram-sha-256\n")

    def _run(self, *cmd: str, check: bool = True) -> None:
        if Path(cmd[0]).name not in ("pg_ctl",) or not self.net.hosts.get("pg"):
            return super()._run(*cmd, check=check)
        p = subprocess.run([*self.net.exec("pg"), "runuser", "-u", "postgres", "--", *cmd], capture_output=True,
                           text=True)
        if check and p.returncode != 0:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {p.stderr.strip()[-500:]}")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.home} -c listen_addresses={self.net.ip('pg')} -c fsync=off "
                f"-c max_connections=300")
        self._run(_pg_bin("pg_ctl"), "-D", str(self.dir), "-l", str(self.log), "-o", opts, "-w", "start")

    def url(self, db: str, password: str | None = None, via_proxy: bool = False) -> str:
        host = self.net.ip("bridge") if via_proxy else self.net.ip("pg")
        return f"postgresql+psycopg://postgres:{password or self.password}@{host}:{self.port}/{db}"


class NetLab(Lab):
    """The hosts, the services on theirs, the proxies and the model server on the bridge."""

    def __init__(self, root: Path, cfg: FaultConfig):
        why = network_unavailable()
        if why:
            raise NetworkUnavailable(why)
        self.net = Net().up()
        try:
            for h in HOSTS:
                self.net.add(h)
            self.root, self.cfg = root, cfg
            self.secrets = {"FAULTS_REDIS_PASSWORD": secrets.token_hex(12),
                            "FAULTS_PG_PASSWORD": secrets.token_hex(12), "FAULTS_MODEL_KEY": secrets.token_hex(12)}
            (root / "secrets.env").write_text("".join(f"{k}={v}\n" for k, v in self.secrets.items()))
            (root / "secrets.env").chmod(0o600)
            self.redis = NetRedis(root, self.secrets["FAULTS_REDIS_PASSWORD"], self.net)
            self.pg = NetPostgres(self.secrets["FAULTS_PG_PASSWORD"], self.net)
            bridge = self.net.ip("bridge")
            # calls of 200 ms at least: a batch lasts through the faults, with calls in flight at each
            self.models = FakeModels(self.secrets["FAULTS_MODEL_KEY"], max(cfg.latency, MODEL_LATENCY), host=bridge)
            self.portfolio = root / "portfolio.toml"
            self.portfolio.write_text(portfolio_text(self.models.port, bridge))
            self.proxies = {"redis": FaultProxy((bridge, REDIS_PORT), (self.net.ip("redis"), REDIS_PORT)),
                            "pg": FaultProxy((bridge, PG_PORT), (self.net.ip("pg"), PG_PORT))}
        except BaseException:
            self.net.down()
            raise

    def __enter__(self) -> "NetLab":
        try:
            for p in self.proxies.values():
                p.start()
            return super().__enter__()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        try:
            with contextlib.suppress(Exception):
                super().__exit__(*exc)
            for p in self.proxies.values():
                p.close()
        finally:
            self.net.down()

    def env(self, db: str, home: Path) -> dict[str, str]:
        env = super().env(db, home)
        bridge = self.net.ip("bridge")
        env.update({
            "CASCADE_BROKER_URL": f"redis://cascade:${{FAULTS_REDIS_PASSWORD}}@{bridge}:{REDIS_PORT}/0",
            "CASCADE_DATABASE_URL": self.pg.url(db, "${FAULTS_PG_PASSWORD}", via_proxy=True),
            "CASCADE_STALE_AFTER": str(self.cfg.env.get("CASCADE_STALE_AFTER", STALE_AFTER)),
        })
        return env


class NetRun(Run):
    """A scenario's deployment with each process on its host: a worker per worker host
    (kept running by the supervisor, in its namespace), the submitter on `api`."""

    def spawn(self, args: list[str], log: str) -> subprocess.Popen:
        host = log.removeprefix("worker-") if log.startswith("worker-") else "api"
        self._n += 1
        self.logs[log] = self.dir / f"{log}-{self._n}.log"
        out = open(self.logs[log], "wb")
        return subprocess.Popen([*self.lab.net.exec(host), sys.executable, "-m", "worker.cli", *args], env=self.env,
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def start_worker(self, host: str) -> None:
        self.workers[host] = self.spawn(["worker", "--tier", WORKERS.get(host, host[:2]), "--portfolio",
                                         str(self.lab.portfolio), "--pool", "threads", "-c",
                                         str(self.lab.cfg.threads), "-l", "WARNING"], f"worker-{host}")

    def __enter__(self) -> "NetRun":
        for h in WORKERS:
            self.start_worker(h)
        threading.Thread(target=self._supervise, daemon=True).start()
        self.wait_started(list(WORKERS))
        return self

    def __exit__(self, *exc) -> None:
        try:
            super().__exit__(*exc)
        finally:  # the next scenario starts on a whole network: every cut healed, every link up
            net = self.lab.net
            net.heal()
            for h in HOSTS:
                if h in net.hosts:
                    net.link(h, True)
                    if h in WORKERS or h == "t2new":
                        net.kill_all(h)  # anything a scenario left on a worker host
            for p in self.lab.proxies.values():
                p.clear()

    def wait_started(self, hosts: list[str] | None = None, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        for h in hosts or list(WORKERS):
            tier = WORKERS.get(h, h[:2])
            while f"tier {tier}: queues".encode() not in self.logs[f"worker-{h}"].read_bytes():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {h} worker did not start within {timeout:g}s")
                time.sleep(0.2)

    def settle(self, budget: float) -> dict:
        """After the batch: a worker that was cut off may still hold calls it made and
        will record once its connection gives up and comes back (tcp_user_timeout, 30 s);
        wait for them (up to 60 s) before the count. Reports what was still open when
        the batch finished and how long they took."""
        open_at_finish = sum(1 for c in self.jobs.calls() if c.state in ("started", "lost"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < min(60.0, budget):
            with contextlib.suppress(Exception):
                if not any(c.state in ("started", "lost") for c in self.jobs.calls()):
                    break
            time.sleep(1.0)
        return {"unfinished_at_batch_end": open_at_finish, "settle_s": round(time.monotonic() - t0, 1)}

    def extra_result(self, budget: float) -> dict:
        """The task API's clients (the net_api_* scenarios): their answers, and the jobs of
        the keys accepted: one each, every one finished (waited for within `budget`)."""
        api = getattr(self, "api", None)
        if api is None:
            return {}
        ids = api.pop("ids")
        deadline = time.monotonic() + budget
        final = set()
        while time.monotonic() < deadline and len(final) < len(set(ids)):
            for j in set(ids) - final:
                with contextlib.suppress(Exception):
                    row = self.jobs.job(j)
                    if row is not None and row["status"] in ("succeeded", "failed", "cancelled"):
                        final.add(j)
            time.sleep(0.5)
        api.update(distinct_jobs=len(set(ids)), jobs_finished=len(final), jobs_lost=len(set(ids)) - len(final))
        return {"api": api}

    def operator_saw(self) -> dict[str, int]:
        """What the logs told an operator: the count of each warning and error event."""
        seen: dict[str, int] = {}
        for p in self.dir.glob("*.log"):
            for m in re.finditer(rb'"event": "([a-z_]+\.[a-z_]+)"', p.read_bytes()):  # structlog's events
                k = m.group(1).decode()
                seen[k] = seen.get(k, 0) + 1
        return dict(sorted(seen.items()))


# -- the scenarios -------------------------------------------------------------------

def _in_flight(run: NetRun, tier: str) -> None:
    model = f"m{TIERS.index(tier)}"
    _wait(lambda: run.lab.models.busy(model) > 0, 60, f"a call in flight at {tier}", step=0.002)


def _cut_worker(ports: Callable[[FaultConfig], tuple[int, ...]], seconds: Callable[[FaultConfig], float]):
    """The t1 worker (one of two) cut from Redis, PostgreSQL or both mid-batch, its model
    calls going on; healed after `seconds`."""
    def scenario(run: NetRun, cfg: FaultConfig) -> float:
        run.write_input(_lines(cfg))
        run.submit()
        _after(run, "t1", 4)
        _in_flight(run, "t1")
        for port in ports(cfg):
            run.lab.net.cut("t1", port)
        outage = seconds(cfg)
        time.sleep(outage)
        run.lab.net.heal("t1")
        return outage
    return scenario


def _cut_submitter(port: int):
    """The submitting host cut from Redis or PostgreSQL while `cascade run` submits."""
    def scenario(run: NetRun, cfg: FaultConfig) -> float:
        run.write_input(_lines(cfg))
        run.submit()
        _wait(lambda: run.batches.batch_count() > 0, 60, "the batch row", step=0.01)
        run.lab.net.cut("api", port)
        time.sleep(cfg.outage_short)
        run.lab.net.heal("api")
        return cfg.outage_short
    return scenario


def _slow_links(run: NetRun, cfg: FaultConfig) -> float:
    """200 ms each way and 1% loss on the Redis and PostgreSQL links, for the outage."""
    for p in run.lab.proxies.values():
        p.set(latency=0.2, loss=0.01)
    try:
        run.write_input(_lines(cfg))
        run.submit()
        time.sleep(cfg.outage_short)
    finally:
        for p in run.lab.proxies.values():
            p.clear()
    return cfg.outage_short


def _resets(run: NetRun, cfg: FaultConfig) -> float:
    """Every connection to Redis and PostgreSQL reset, three times a few seconds apart."""
    run.write_input(_lines(cfg))
    run.submit()
    _after(run, "t0", cfg.jobs // 5)
    for _ in range(3):
        for p in run.lab.proxies.values():
            p.reset_all()
        time.sleep(2.0)
    return 6.0


def _heal_after_resend(run: NetRun, cfg: FaultConfig) -> float:
    """t1 cut from both Redis and PostgreSQL with calls in flight, for longer than the
    sweeper's idle time: the other t1 worker's sweeper re-sends its jobs (their lease
    expired: its heartbeat could not reach the database) and runs them; the partition
    heals just after, and the cut worker records what it called meanwhile."""
    run.write_input(_lines(cfg))
    run.submit()
    _after(run, "t1", 4)
    _in_flight(run, "t1")
    run.lab.net.cut("t1", REDIS_PORT)
    run.lab.net.cut("t1", PG_PORT)
    t0 = time.monotonic()
    stale = float(run.env["CASCADE_STALE_AFTER"])
    logs = run.logs["worker-t1b"]
    # until the t1b sweeper re-sent (its log says so), then a moment, then heal
    _wait(lambda: b"sweep.resent" in logs.read_bytes(), stale * 4 + 30, "the sweeper's re-send", step=0.2)
    time.sleep(1.0)
    run.lab.net.heal("t1")
    return time.monotonic() - t0


def _host_gone(run: NetRun, cfg: FaultConfig) -> float:
    """t2's host gone for good mid-batch (its link down, its worker dead); the other tiers
    go on, t2's jobs wait; after the outage a replacement worker starts on a new host."""
    run.write_input(_lines(cfg))
    run.submit()
    _after(run, "t2", 4)
    run.hold.add("t2")
    run.lab.net.link("t2", False)
    run.lab.net.kill_all("t2")
    time.sleep(cfg.outage_short)
    run.start_worker("t2new")
    run.wait_started(["t2new"])
    return cfg.outage_short


API_PORT = 8000


def _api_cut(port: int):
    """`cascade serve` on the api host, clients on the bridge submitting jobs one after
    another (each with its Idempotency-Key, a 503 or a broken request sent again with the
    same key after Retry-After) while the api host is cut from Redis or PostgreSQL;
    a batch through `cascade run` beside them. Counted after: every key accepted has
    exactly one job, and each of those jobs finished."""
    def scenario(run: NetRun, cfg: FaultConfig) -> float:
        net = run.lab.net
        serve = run.spawn(["serve", "--portfolio", str(run.lab.portfolio), "--host", net.ip("api"),
                           "--port", str(API_PORT)], "serve")
        run.submitters.append(serve)  # stopped with the run
        url = f"http://{net.ip('api')}:{API_PORT}"
        _wait(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 120, "the task API ready", step=0.2)
        _, key = Tenants(TenantStore(run.url), Settings(database_url=run.url)).create_key("drill")
        n = max(20, cfg.jobs // 5)
        stats = run.api = {"requests": n, "accepted": 0, "answers": {}, "retries": 0, "slowest_accept_s": 0.0,
                           "ids": []}
        deadline = time.monotonic() + cfg.outage_short + cfg.budget

        def clients() -> None:
            with httpx.Client(base_url=url, timeout=40, headers={"Authorization": f"Bearer {key}"}) as h:
                for i in range(n):
                    while time.monotonic() < deadline:
                        t = time.monotonic()
                        try:
                            r = h.post("/v1/jobs", json={"prompt": f"api question {i}: {i} * 3?"},
                                       headers={"Idempotency-Key": f"drill-{i}"})
                            code = str(r.status_code)
                        except httpx.HTTPError as e:
                            r, code = None, type(e).__name__
                        stats["answers"][code] = stats["answers"].get(code, 0) + 1
                        if r is not None and r.status_code in (200, 202):
                            stats["accepted"] += 1
                            stats["ids"].append(r.json()["id"])
                            stats["slowest_accept_s"] = round(max(stats["slowest_accept_s"], time.monotonic() - t), 2)
                            break
                        stats["retries"] += 1
                        wait = float(r.headers.get("Retry-After", 1)) if r is not None else 1.0
                        time.sleep(min(wait, 5.0))
                    time.sleep(0.2)  # a steady trickle of requests across the cut

        client = threading.Thread(target=clients, daemon=True)
        run.write_input(_lines(cfg))
        run.submit()
        # the batch beside the clients has begun (its row is in) before the cut, whatever this
        # machine's speed: a `cascade run` cut before its first connection is another scenario
        _wait(lambda: run.batches.batch_count() > 0, 60, "the batch row", step=0.01)
        client.start()
        time.sleep(2.0)
        net.cut("api", port)
        time.sleep(cfg.outage_short)
        net.heal("api")
        client.join(cfg.budget)
        return cfg.outage_short
    return scenario


NET_SCENARIOS: dict[str, Callable] = {
    "net_baseline": lambda run, cfg: (run.write_input(_lines(cfg)), run.submit(), 0.0)[-1],
    "net_worker_redis_cut": _cut_worker(lambda c: (REDIS_PORT,), lambda c: c.outage_short),
    "net_worker_redis_cut_long": _cut_worker(lambda c: (REDIS_PORT,), lambda c: c.outage_long),
    "net_worker_pg_cut": _cut_worker(lambda c: (PG_PORT,), lambda c: c.outage_short),
    "net_worker_pg_cut_long": _cut_worker(lambda c: (PG_PORT,), lambda c: c.outage_long),
    "net_submitter_redis_cut": _cut_submitter(REDIS_PORT),
    "net_submitter_pg_cut": _cut_submitter(PG_PORT),
    "net_api_redis_cut": _api_cut(REDIS_PORT),
    "net_api_pg_cut": _api_cut(PG_PORT),
    "net_slow_links": _slow_links,
    "net_resets": _resets,
    "net_heal_after_resend": _heal_after_resend,
    "net_host_gone": _host_gone,  # last: the others need no host gone (each run restores the network all the same)
}
LONG = {"net_worker_redis_cut_long", "net_worker_pg_cut_long"}  # only with --long


def run_network_faults(cfg: FaultConfig, names: list[str] | None = None, root: Path | None = None,
                       long: bool = False) -> dict:
    names = names or [n for n in NET_SCENARIOS if long or n not in LONG]
    unknown = [n for n in names if n not in NET_SCENARIOS]
    if unknown:
        raise ValueError(f"unknown network scenario(s) {unknown}; known: {', '.join(NET_SCENARIOS)}")
    root = root or Path(tempfile.mkdtemp(prefix="cascade-netfaults-"))
    with NetLab(root, cfg) as lab:
        return {"network_faults": run_each(names, lambda name: run_scenario(lab, name, NET_SCENARIOS, NetRun),
                                           cfg.log)}
