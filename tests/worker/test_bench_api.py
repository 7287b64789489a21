"""`cascade bench api` talks to its own `cascade serve`: a port another process holds
is refused before anything starts (it used to trust any /readyz answer there and crash
with KeyError: 'cascade'), and by default the bench picks a spare port; a streamed batch
is timed in, then the queue running it, in the same command."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker.bench.api import ApiBenchConfig, run_api_bench

pytestmark = pytest.mark.services


class Squatter:
    """Another process's HTTP server: 200 and a JSON body to anything, /readyz included."""

    def __enter__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _ok(self):
                body = json.dumps({"status": "ready", "choices": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _ok

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_a_port_another_process_holds_is_refused_naming_it(bench):
    with Squatter() as other:
        with pytest.raises(Exception) as e:
            run_api_bench(ApiBenchConfig(data=bench / "rc-mmlu.jsonl.gz", requests=2, concurrency=1, port=other.port,
                                         log=lambda m: None))
    assert not isinstance(e.value, KeyError), repr(e.value)
    assert f"port {other.port} is in use" in str(e.value)


def test_by_default_the_bench_serves_on_a_spare_port(bench):
    with Squatter():  # someone else's server on some port changes nothing
        out = run_api_bench(ApiBenchConfig(data=bench / "rc-mmlu.jsonl.gz", requests=3, concurrency=1,
                                           batch_items=400, drain_jobs=300, log=lambda m: None))
    assert out["http"]["requests_per_s"] > 0 and out["client"]["requests_per_s"] > 0
    # the streamed batch went in whole, then the queue ran it with the tier workers started again
    b = out["batch"]
    assert b["items"] == 400 and b["api_peak_rss_mb"] > 0
    assert 0 < b["drain_jobs"] <= 400 and b["drain_jobs_per_s"] > 0
    assert b["ingest_to_pipeline_ratio"] == pytest.approx(b["items_per_s"] / b["drain_jobs_per_s"], rel=1e-2)
