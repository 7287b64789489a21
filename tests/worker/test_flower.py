"""`cascade flower` on real Redis + PostgreSQL with tier workers, driven by headless
Chromium: behind basic auth (pages and API), the API answers the authenticated
user, and the tier queues, the workers and the stage tasks (with their tier and job
count) appear. Screenshots go to $CASCADE_TEST_OUTPUT (default out/tests/) and the
test's tmp folder."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers.env import REPO
from helpers.portfolios import write_portfolio
from helpers.servers import free_port

from router.core.portfolio import load_portfolio
from worker.queue.items import read_items
from worker.queue.run import run_batch

pytestmark = [pytest.mark.services, pytest.mark.slow]  # a browser

MODELS = ["llama3.2-3b", "llama3.1-405b"]
USER, PASSWORD = "ops", "s3cret-pass"


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no Chromium: ops/setup.sh installs Debian's `chromium` with apt-get, which needs root "
                    "and a Debian/Ubuntu package source; install it and re-run")
    return path


def output_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("CASCADE_TEST_OUTPUT", REPO / "out" / "tests")) / "flower"
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_flower_shows_tier_queues_workers_and_tasks_behind_auth(bench, distributed, workers, tmp_path):
    browser_path = chromium()
    from playwright.sync_api import expect, sync_playwright  # deferred: only once Chromium is known to exist

    settings, env = distributed
    path = write_portfolio(tmp_path / "p.toml", bench, MODELS, [-0.3])
    portfolio = load_portfolio(path)
    w = workers(path)
    w.env["CASCADE_CANARY_INTERVAL"] = "1"  # canaries: the first tasks Flower sees, once events flow
    w.env["CASCADE_REMOTE_CONTROL"] = "flower"  # remote control is off by default; Flower needs its read-only part
    for t in portfolio.tiers:
        w.start(t.name)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen([sys.executable, "-m", "worker.cli", "flower", "--port", str(port)],
                              env={**os.environ, **env, "CASCADE_FLOWER_BASIC_AUTH": f"{USER}:{PASSWORD}",
                                   "CASCADE_REMOTE_CONTROL": "flower"},
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        auth = (USER, PASSWORD)
        end = time.time() + 60
        while time.time() < end:
            try:
                if httpx.get(f"{base}/api/workers", auth=auth, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert flower.poll() is None, (tmp_path / "flower.log").read_text()
            time.sleep(0.5)
        # nothing without credentials, pages or API
        assert httpx.get(f"{base}/", timeout=5).status_code == 401
        assert httpx.get(f"{base}/api/workers", timeout=5).status_code == 401
        assert httpx.get(f"{base}/api/workers", auth=(USER, "wrong"), timeout=5).status_code == 401

        # Flower turns events on in the workers: once it sees both workers' canaries, run a batch
        host = socket.gethostname()
        nodes = {f"t0@{host}", f"t1@{host}"}
        end = time.time() + 60
        while time.time() < end:
            seen = {t.get("worker") for t in httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).json().values()}
            if nodes <= seen:
                break
            time.sleep(0.5)
        assert nodes <= seen, (tmp_path / "flower.log").read_text()[-3000:]
        items = read_items(bench / "rc-mmlu.jsonl.gz", split="test", limit=40)
        run_batch(items, portfolio, settings=settings, batch_id="fl", progress=False, timeout=120)

        end = time.time() + 30
        while time.time() < end:
            api_workers = httpx.get(f"{base}/api/workers", auth=auth, params={"refresh": "1"}, timeout=10).json()
            tasks = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
            done = {t.get("worker") for t in tasks.values() if t["name"] == "cascade.stage"}
            if nodes <= set(api_workers) and done >= nodes:
                break
            time.sleep(1)
        assert nodes <= set(api_workers), api_workers
        stage = [t for t in tasks.values() if t["name"] == "cascade.stage"]
        assert stage and all(t["state"] == "SUCCESS" for t in stage), tasks
        # a stage task's args name its tier, job count and first job (message size is the tier's to choose)
        assert any(re.match(r"tier=t0 jobs=\d+ first=fl:", t["args"]) for t in stage), [t["args"] for t in stage]
        assert {t["worker"] for t in stage} == nodes

        out = output_dir(tmp_path)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(http_credentials={"username": USER, "password": PASSWORD},
                                       viewport={"width": 1400, "height": 900}).new_page()
            page.goto(f"{base}/workers")
            for node in nodes:
                page.get_by_text(node).first.wait_for(timeout=30000)
            page.screenshot(path=str(out / "workers.png"), full_page=True)
            page.goto(f"{base}/broker")
            for t in portfolio.tiers:
                page.get_by_text(t.queue_name, exact=True).first.wait_for(timeout=30000)
            page.screenshot(path=str(out / "broker.png"), full_page=True)
            page.goto(f"{base}/tasks")
            page.get_by_placeholder("state:FAILURE worker:celery@hostname").fill("cascade.stage")
            page.locator("td", has_text="cascade.stage").first.wait_for(timeout=30000)
            # filtered out (the table redraws a moment after the filter is typed)
            expect(page.locator("td", has_text="cascade.canary")).to_have_count(0, timeout=30000)
            page.screenshot(path=str(out / "tasks.png"), full_page=True)
            first = next(t for t in stage if t["args"].startswith("tier=t0 jobs="))
            page.goto(f"{base}/task/{first['uuid']}")
            page.get_by_text(first["args"]).first.wait_for(timeout=30000)
            page.screenshot(path=str(out / "task.png"), full_page=True)
            browser.close()
        for name in ("workers.png", "broker.png", "tasks.png", "task.png"):
            assert (out / name).stat().st_size > 10_000
            shutil.copy(out / name, tmp_path / name)
    finally:
        flower.terminate()
        try:
            flower.wait(15)
        except subprocess.TimeoutExpired:
            flower.kill()
