"""Flower out of the box: the README's distributed commands run as they are written
(only the database URL and the Redis key prefix are the test's own, Flower listens on
a spare port instead of 5555, and a scratch folder stands in for the checkout so
`results.jsonl` does not land in it), with no other variable: no
CASCADE_REMOTE_CONTROL. Flower, driven by headless Chromium and through its API,
must show every tier worker, every tier queue with its length, and the stage tasks
as they run, behind basic auth. Screenshots go to $CASCADE_TEST_OUTPUT (default
out/tests/) and the test's tmp folder."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers.env import REDIS, REPO, SHARED
from helpers.servers import free_port

pytestmark = [pytest.mark.services, pytest.mark.slow]  # a browser

TIERS = ["small", "medium", "large"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium: ops/setup.sh installs Debian's `chromium` with apt-get, which needs root "
                    "and a Debian/Ubuntu package source; install it and re-run")
    return path


def output_dir() -> Path:
    out = Path(os.environ.get("CASCADE_TEST_OUTPUT", REPO / "out" / "tests")) / "flower"
    out.mkdir(parents=True, exist_ok=True)
    return out


def readme_commands() -> list[str]:
    """The command lines of the README's distributed-mode block, as written."""
    section = (REPO / "README.md").read_text().split("## Distributed mode", 1)[1]
    block = section.split("```", 2)[1]
    return [line for line in block.strip().splitlines() if line.strip()]


def split_line(line: str) -> list[tuple[list[str], bool]]:
    """A shell line's commands, each with whether it runs in the background (`&`)."""
    tokens = shlex.split(line, comments=True)
    out, cur = [], []
    for t in tokens:
        if t == "&":
            out.append((cur, True))
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append((cur, False))
    return out


class Shell:
    """Runs the README's lines: `export` sets the environment, `NAME=VALUE cascade ...`
    runs `cascade` with that variable, `&` in the background."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path, swap: dict[str, str], flower_port: int):
        self.cwd, self.env, self.logs, self.swap, self.flower_port = cwd, env, logs, swap, flower_port
        self.background: list[subprocess.Popen] = []

    def argv(self, words: list[str]) -> tuple[list[str], dict[str, str]]:
        env = dict(self.env)
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            k, _, v = words.pop(0).partition("=")
            env[k] = v
        assert words[0] == "cascade", words
        args = words[1:]
        if args[0] == "flower":
            args = [*args, "--port", str(self.flower_port)]  # 5555 may belong to someone else on this machine
        return [sys.executable, "-m", "worker.cli", *args], env

    def run(self, line: str) -> subprocess.Popen | None:
        """Run one line; returns the foreground process, started (the caller waits for it)."""
        fg = None
        for words, background in split_line(line):
            if words[0] == "export":
                k, _, v = words[1].partition("=")
                self.env[k] = self.swap.get(k, v)
                continue
            argv, env = self.argv(words)
            log = open(self.logs / f"{len(list(self.logs.iterdir()))}-{argv[3]}.log", "ab")
            p = subprocess.Popen(argv, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT)
            if background:
                self.background.append(p)
            else:
                fg = p
        return fg

    def stop(self) -> None:
        for p in self.background:
            if p.poll() is None:
                p.terminate()
        for p in self.background:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log_text(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(self.logs.iterdir()))


def test_flower_out_of_the_box_following_the_readme(bench, pg_url, redis_prefix, tmp_path):
    browser_path = chromium()
    from playwright.sync_api import sync_playwright  # deferred: only once Chromium is known to exist

    # a scratch checkout: the README's relative paths (ops/..., ../shared/...) resolve as in the repository
    work = tmp_path / "work"
    (work / "checkout").mkdir(parents=True)
    (work / "checkout" / "ops").symlink_to(REPO / "ops")
    (work / "shared").symlink_to(SHARED)
    (tmp_path / "logs").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    env["PYTHONPATH"] = str(REPO)
    env["CASCADE_REDIS_PREFIX"] = redis_prefix  # the test's own keys on the machine's Redis
    lines = readme_commands()
    assert not any("REMOTE_CONTROL" in line for line in lines)
    port = free_port()
    sh = Shell(work / "checkout", env, tmp_path / "logs", {"CASCADE_DATABASE_URL": pg_url}, port)
    base = f"http://127.0.0.1:{port}"
    m = re.search(r"CASCADE_FLOWER_BASIC_AUTH=(\S+):(\S+)", "\n".join(lines))
    auth = (m.group(1), m.group(2))
    host = socket.gethostname()
    nodes = {f"{t}@{host}" for t in TIERS}
    *setup, run_line = lines
    try:
        for line in setup:
            p = sh.run(line)
            if p is not None:
                assert p.wait(120) == 0, sh.log_text()
        assert sh.env["CASCADE_BROKER_URL"] == REDIS and sh.env["CASCADE_DATABASE_URL"] == pg_url
        # Flower is up and lists every tier worker (they start in the background: wait, as a person would)
        api_workers: dict = {}
        end = time.time() + 120
        while time.time() < end:
            try:
                r = httpx.get(f"{base}/api/workers", auth=auth, params={"refresh": "1"}, timeout=10)
                api_workers = r.json() if r.status_code == 200 else {}
            except (httpx.TransportError, ValueError):
                pass
            if nodes <= set(api_workers):
                break
            assert all(p.poll() is None for p in sh.background), sh.log_text()
            time.sleep(1)
        assert nodes <= set(api_workers), (api_workers, sh.log_text())
        for t in TIERS:  # each worker consumes its tier's queue
            assert f"cascade.{t}" in {q["name"] for q in api_workers[f"{t}@{host}"]["active_queues"]}
        # nothing without credentials, pages or API
        assert httpx.get(f"{base}/", timeout=5).status_code == 401
        assert httpx.get(f"{base}/api/workers", timeout=5).status_code == 401
        assert httpx.get(f"{base}/api/workers", auth=(auth[0], "wrong"), timeout=5).status_code == 401

        out = output_dir()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(http_credentials={"username": auth[0], "password": auth[1]},
                                       viewport={"width": 1400, "height": 900}).new_page()
            # the batch, and Flower while it runs: its stage tasks appear as they are received and run
            run = sh.run(run_line)
            live: list[dict] = []
            while run.poll() is None:
                tasks = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
                live = [t for t in tasks.values() if t["name"] == "cascade.stage"]
                if live and not (out / "tasks-running.png").exists():
                    page.goto(f"{base}/broker")  # the queues' lengths mid-batch
                    page.get_by_text("cascade.small", exact=True).first.wait_for(timeout=30000)
                    page.screenshot(path=str(out / "broker-running.png"), full_page=True)
                    page.goto(f"{base}/tasks")
                    page.locator("td", has_text="cascade.stage").first.wait_for(timeout=30000)
                    page.screenshot(path=str(out / "tasks-running.png"), full_page=True)
                time.sleep(0.5)
            assert run.returncode == 0, sh.log_text()
            assert live, "Flower listed no stage task while the batch ran"
            assert len((work / "checkout" / "results.jsonl").read_text().splitlines()) == 1531

            end = time.time() + 60
            while time.time() < end:
                tasks = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
                stage = [t for t in tasks.values() if t["name"] == "cascade.stage"]
                if {t["worker"] for t in stage} >= nodes and all(t["state"] == "SUCCESS" for t in stage):
                    break
                time.sleep(1)
            assert {t["worker"] for t in stage} >= nodes and all(t["state"] == "SUCCESS" for t in stage), stage
            # a stage task's args name its tier, job count and first job
            assert any(re.match(r"tier=small jobs=\d+ first=", t["args"]) for t in stage), [t["args"] for t in stage]
            # every tier queue with its length (Flower reads them from the workers' active queues)
            lengths = httpx.get(f"{base}/api/queues/length", auth=auth, timeout=10).json()["active_queues"]
            assert {f"cascade.{t}" for t in TIERS} <= {q["name"] for q in lengths}, lengths
            assert all(isinstance(q["messages"], int) for q in lengths)

            page.goto(f"{base}/workers")
            for node in nodes:
                page.get_by_text(node).first.wait_for(timeout=30000)
            page.screenshot(path=str(out / "workers.png"), full_page=True)
            page.goto(f"{base}/broker")
            for t in TIERS:
                page.get_by_text(f"cascade.{t}", exact=True).first.wait_for(timeout=30000)
            page.screenshot(path=str(out / "broker.png"), full_page=True)
            page.goto(f"{base}/tasks")
            page.get_by_placeholder("state:FAILURE worker:celery@hostname").fill("cascade.stage")
            page.locator("td", has_text="cascade.stage").first.wait_for(timeout=30000)
            page.screenshot(path=str(out / "tasks.png"), full_page=True)
            first = next(t for t in stage if t["args"].startswith("tier=small jobs="))
            page.goto(f"{base}/task/{first['uuid']}")
            page.get_by_text(first["args"]).first.wait_for(timeout=30000)
            page.screenshot(path=str(out / "task.png"), full_page=True)
            browser.close()
        for name in ("workers.png", "broker.png", "tasks.png", "task.png", "broker-running.png", "tasks-running.png"):
            assert (out / name).stat().st_size > 10_000
            shutil.copy(out / name, tmp_path / name)
    finally:
        sh.stop()
