"""docker/compose.yaml started for real: docker/podman/compose_check.py (`make
compose-check`) runs it with podman-compose and docker/compose.podman.yaml (host
network, Redis, PostgreSQL and Prometheus from Debian's packages on ports of their
own), and checks the migration step, every health check, a batch through the API read
back from the compose PostgreSQL, Flower's /api/workers behind basic auth, Prometheus'
targets, and a SIGKILLed tier worker restarted by its restart policy that then works
another batch. It never touches the machine's own Redis (6379) or PostgreSQL (5432)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import BENCH, REPO

pytestmark = [pytest.mark.services, pytest.mark.timeout(2400)]
PORTS = [16379, 15432, 18000, 15555, 19090, 19101, 19102, 19103]  # docker/compose.podman.yaml's


def test_the_compose_file_comes_up_works_a_batch_lists_workers_in_flower_and_restarts_a_killed_worker():
    if shutil.which("podman") is None or os.geteuid() != 0:
        pytest.skip("podman as root is needed (ops/setup.sh installs Debian's podman, runc, fuse-overlayfs and "
                    "debootstrap with apt-get, as root)")
    compose = Path(sys.executable).with_name("podman-compose")
    if not compose.exists() and shutil.which("podman-compose") is None:
        pytest.fail("podman-compose is missing: bash ops/setup.sh installs it into .venv")
    env = {**os.environ, "PATH": f"{compose.parent}{os.pathsep}{os.environ['PATH']}", "CASCADE_SHARED": str(BENCH.parent)}
    # a run that was killed may have left its project behind: removed first, then the ports must be free
    subprocess.run([sys.executable, "docker/podman/compose_check.py", "down"], cwd=REPO, capture_output=True,
                   env={**env, "CASCADE_COMPOSE_PROJECT": "cascade-check"}, timeout=900)
    for port in PORTS:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken on this machine; docker/compose.podman.yaml needs it free")
    r = subprocess.run([sys.executable, "docker/podman/compose_check.py", "check"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=2300)
    lines = [x for x in r.stdout.splitlines() if x.startswith("[compose-check")]
    print("\n" + "\n".join(lines))
    assert r.returncode == 0, f"{r.stdout[-6000:]}\n{r.stderr[-4000:]}"
    assert any("every check passed" in x for x in lines)
