"""The image's health check: one command that checks whatever role the container runs.

It reads the `cascade ...` command line of the container's process and asks:
  cascade worker  -> GET /healthz on the metrics port: the canary, 503 once the worker
                     stopped consuming (port from --metrics-port or CASCADE_METRICS_PORT)
  cascade serve   -> GET /readyz: the API's database and broker answer
  cascade flower  -> GET /healthcheck: Flower's own health page
anything else (db upgrade, run, ...) is a one-shot job: nothing to check, exit 0.
Exit 0 healthy, 1 not. Standard library only (it runs every 30 s).
"""
from __future__ import annotations

import base64
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

ROLES = ("worker", "serve", "flower")


def cascade_argv() -> list[str]:
    """The arguments after `cascade` of the container's cascade process (PID 1, or under an init)."""
    pids = sorted(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    for pid in pids:
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        for i, a in enumerate(args[:3]):
            if os.path.basename(a) == "cascade":
                return args[i + 1:]
    return []


def option(args: list[str], name: str, default: str | None = None) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def local(host: str | None) -> str:
    return "127.0.0.1" if host in (None, "", "0.0.0.0", "::", "[::]") else host


def get(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=8) as r:
            body = r.read(300).decode(errors="replace").strip()
            print(f"{url}: {r.status} {body}")
            return 0 if r.status == 200 else 1
    except urllib.error.HTTPError as e:
        print(f"{url}: {e.code} {e.read(300).decode(errors='replace').strip()}")
    except OSError as e:
        print(f"{url}: {e}")
    return 1


def main() -> int:
    args = cascade_argv()
    role = next((a for a in args if a in ROLES), None)
    if role == "worker":
        port = option(args, "--metrics-port", os.environ.get("CASCADE_METRICS_PORT", "0"))
        if not port or int(port) == 0:
            print("cascade worker without a metrics port: no canary to check (set CASCADE_METRICS_PORT)")
            return 1
        return get(f"http://127.0.0.1:{int(port)}/healthz")
    if role == "serve":
        host, port = local(option(args, "--host")), option(args, "--port", "8000")
        return get(f"http://{host}:{int(port)}/readyz")
    if role == "flower":
        host, port = local(option(args, "--address")), option(args, "--port", "5555")
        auth = option(args, "--basic-auth", os.environ.get("CASCADE_FLOWER_BASIC_AUTH", ""))
        headers = {}
        if auth:  # /healthcheck is open in Flower 2.2; the credentials keep it working if that changes
            headers["Authorization"] = "Basic " + base64.b64encode(auth.split(",")[0].encode()).decode()
        return get(f"http://{host}:{int(port)}/healthcheck", headers)
    print(f"cascade {' '.join(args[:2]) or '(no command)'}: a one-shot command, nothing to check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
