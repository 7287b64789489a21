"""Test helpers: a real OpenAI-compatible server (llama-cpp-python's, with the tiny
model) in a subprocess on 127.0.0.1, and a small HTTP proxy in front of it that can
answer 5xx, stall, or forward."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from helpers.env import REPO as ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# llama-cpp-python's server, started through a wrapper that applies the same
# "no extra buffer types" fix as the llamacpp backend (see worker/models/backends/llamacpp.py).
_LAUNCH = (
    "import runpy, sys; sys.path.insert(0, {root!r});"
    "from worker.models.backends.llamacpp import disable_extra_buffers; disable_extra_buffers();"
    "sys.argv = ['llama_cpp.server'] + sys.argv[1:];"
    "runpy.run_module('llama_cpp.server', run_name='__main__')"
)


class LlamaServer:
    """llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`) in a
    subprocess on 127.0.0.1 (a spare port unless given): one model (alias "tiny"), or
    several from a {alias: path} map, which it serves one at a time (a request naming
    another alias swaps the loaded model; an unknown alias gets the first). One thread
    per model and a small context: the machine is shared."""

    def __init__(self, model_path: Path | dict[str, Path], port: int | None = None, n_ctx: int = 512,
                 n_threads: int = 1):
        import tempfile

        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.config = None
        launch = [sys.executable, "-c", _LAUNCH.format(root=str(ROOT))]
        if isinstance(model_path, dict):
            self.config = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
            json.dump({"host": "127.0.0.1", "port": self.port, "models": [
                {"model": str(path), "model_alias": alias, "n_ctx": n_ctx, "n_threads": n_threads,
                 "n_threads_batch": n_threads, "verbose": False} for alias, path in model_path.items()]},
                self.config)
            self.config.close()
            self.cmd = [*launch, "--config_file", self.config.name]
        else:
            self.cmd = [*launch, "--model", str(model_path), "--host", "127.0.0.1", "--port", str(self.port),
                        "--n_ctx", str(n_ctx), "--n_threads", str(n_threads), "--n_threads_batch", str(n_threads),
                        "--model_alias", "tiny", "--verbose", "False"]
        self.proc: subprocess.Popen | None = None
        self.logfile = None

    def start(self, timeout: float = 90.0) -> "LlamaServer":
        import tempfile

        # a file, not a pipe: llama.cpp's load log would fill a pipe nobody reads and block the server
        self.logfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.cmd, stdout=self.logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n{self.output()[-2000:]}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not come up on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.logfile is not None:
            self.logfile.close()
            self.logfile = None
        if self.config is not None:
            Path(self.config.name).unlink(missing_ok=True)

    def output(self) -> str:
        if self.logfile is None:
            return ""
        self.logfile.seek(0)
        return self.logfile.read().decode(errors="replace")

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _TestHTTPServer:
    """A threaded HTTP server on 127.0.0.1 (a spare port unless given) whose POSTs go to
    `self.handle`."""

    def __init__(self, port: int = 0):
        self.requests = 0
        self.bodies: list[dict] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                with outer._lock:
                    outer.requests += 1
                    n = outer.requests
                    try:
                        outer.bodies.append(json.loads(raw))
                    except ValueError:
                        outer.bodies.append({})
                status, headers, payload = outer.handle(n, self.path, raw)
                try:
                    self.send_response(status)
                    for k, v in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (read timeout)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def handle(self, n: int, path: str, raw: bytes) -> tuple[int, dict, bytes]:
        raise NotImplementedError

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class FlakyProxy(_TestHTTPServer):
    """Forwards POSTs to `upstream`, except: the first `fail_first` requests (or all,
    with always_fail) get `status` (with `retry_after` if set); with `stall` set every
    request waits that long first."""

    def __init__(self, upstream: str, *, fail_first: int = 0, status: int = 503, retry_after: str | None = None,
                 stall: float = 0.0, always_fail: bool = False, port: int = 0):
        super().__init__(port)
        self.upstream = upstream.rstrip("/")
        self.fail_first, self.status, self.retry_after = fail_first, status, retry_after
        self.stall, self.always_fail = stall, always_fail

    def handle(self, n, path, raw):
        if self.stall:
            time.sleep(self.stall)
        if self.always_fail or n <= self.fail_first:
            headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
            return self.status, headers, json.dumps({"error": {"message": "server overloaded (test proxy)"}}).encode()
        try:
            r = httpx.post(self.upstream + path.removeprefix("/v1"), content=raw,
                           headers={"content-type": "application/json"}, timeout=60)
            return r.status_code, {}, r.content
        except httpx.HTTPError as e:
            return 502, {}, json.dumps({"error": {"message": f"upstream: {e}"}}).encode()


class LogprobStripper(FlakyProxy):
    """Forwards to `upstream` and takes the token log-probs out of every answer (`"logprobs":
    null`), as a server that never returns them does: fault injection in front of a real
    server."""

    def __init__(self, upstream: str, port: int = 0):
        super().__init__(upstream, port=port)

    def handle(self, n, path, raw):
        status, headers, payload = super().handle(n, path, raw)
        if status == 200:
            data = json.loads(payload)
            for choice in data.get("choices") or []:
                choice["logprobs"] = None
            payload = json.dumps(data).encode()
        return status, headers, payload


class CannedServer(_TestHTTPServer):
    """Answers every POST with one fixed JSON body (parsing tests without a model)."""

    def __init__(self, body: dict | str, status: int = 200, headers: dict | None = None, port: int = 0):
        super().__init__(port)
        self.body = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.status, self.headers = status, headers or {}

    def handle(self, n, path, raw):
        return self.status, self.headers, self.body


class ScriptedModel(_TestHTTPServer):
    """An OpenAI-compatible chat server whose answers and failures follow the prompt,
    whatever the order or concurrency of the requests: the answer and its token
    log-probs come from (model, prompt) (worker.bench.fakeserver.answer); a prompt with
    `[bad]` gets a 400 (not retried), `[down]` a 503 every time, `[flaky]` a 503 the
    first time this model sees it, `[slow]` its answer after `slow` seconds. Counts
    the requests per (model, prompt) and the most it had in flight."""

    def __init__(self, slow: float = 0.2):
        super().__init__()
        self.slow = slow
        self.seen: dict[tuple[str, str], int] = {}
        self.in_flight = 0
        self.peak = 0

    def handle(self, n, path, raw):
        from worker.bench.fakeserver import answer

        body = json.loads(raw)
        model, prompt = body["model"], body["messages"][-1]["content"]
        with self._lock:
            k = self.seen[(model, prompt)] = self.seen.get((model, prompt), 0) + 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            if "[slow]" in prompt:
                time.sleep(self.slow)
            if "[bad]" in prompt:
                return 400, {}, json.dumps({"error": {"message": "bad request (scripted)"}}).encode()
            if "[down]" in prompt or ("[flaky]" in prompt and k == 1):
                return 503, {}, json.dumps({"error": {"message": "overloaded (scripted)"}}).encode()
            return 200, {}, json.dumps(answer(f"{model}|{prompt}")).encode()
        finally:
            with self._lock:
                self.in_flight -= 1
