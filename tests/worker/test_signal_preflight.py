"""The signal preflight (worker.models.preflight) and the run-time report of a decision
taken without its signal, against canned OpenAI-style answers (fault injection: a
server without log-probs, one that is down, one that refuses); the same against the
real llama-cpp-python server is in tests/pipeline/test_real_openai_server.py."""
from __future__ import annotations

import json
import math
import time

import pytest
from click.testing import CliRunner
from helpers.servers import CannedServer, free_port

from router.core.policy import Needs
from router.core.portfolio import BackendSpec, Tier, load_portfolio
from worker.models.backends import build_backend
from worker.models.preflight import PROBE_PROMPT, PreflightRefused, ensure_signals, probe, verify_later

WITH = {"choices": [{"message": {"role": "assistant", "content": "Yes"}, "finish_reason": "stop",
                     "logprobs": {"content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": [
                         {"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": -2.4}]}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1}}
WITHOUT = {"choices": [{"message": {"role": "assistant", "content": "4"}, "finish_reason": "stop", "logprobs": None}],
           "usage": {"prompt_tokens": 10, "completion_tokens": 1}}


def backend(url: str, name: str = "cheap", **opts):
    return build_backend(Tier(name=name, backend=BackendSpec.model_validate(
        {"kind": "openai", "base_url": url, "model": "m", "max_tokens": 8, "connect_timeout": 1, **opts})))


def test_a_server_without_logprobs_is_refused_naming_tier_signal_server_and_fix():
    with CannedServer(WITHOUT) as srv:
        b = backend(srv.base_url)
        p = probe(b, Needs(signals=("min_logprob",)))
        with pytest.raises(PreflightRefused) as e:
            ensure_signals(b, Needs(signals=("min_logprob",)))
        degraded = ensure_signals(b, Needs(signals=("min_logprob",)), allow_missing=True)
        sent = srv.bodies[0]
    assert p.status == "missing" and p.missing == ["min_logprob"] and not p.ok
    msg = str(e.value)
    print(msg)
    for part in ("tier 'cheap'", "'min_logprob'", srv.base_url, "without token log-probs although they were asked "
                 "for", "Fix:", "--allow-missing-signals", "The worker does not start"):
        assert part in msg, part
    assert degraded.status == "missing"  # started, degraded: the caller logs it
    # the probe is one short question with the tier's own needs
    assert sent["messages"][-1]["content"] == PROBE_PROMPT and sent["max_tokens"] == 8
    assert sent["logprobs"] is True and sent["top_logprobs"] == 1


def test_a_server_with_logprobs_passes_and_p_true_comes_from_one_verdict_call():
    with CannedServer(WITH) as srv:
        b = backend(srv.base_url)
        p = probe(b, Needs(signals=("min_logprob",)))
        assert p.status == "ok" and p.signals["min_logprob"] == -0.1 and "ok" in p.message()
        q = probe(b, Needs(signals=("p_true",)))
        verdict = srv.bodies[-1]
    assert q.status == "ok", q.message()
    assert q.signals["p_true"] == pytest.approx(math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.4)))
    assert verdict["top_logprobs"] == 10 and "Is the proposed answer correct?" in verdict["messages"][-1]["content"]


def test_a_server_not_up_yet_is_waited_for_with_backoff_then_probed():
    port = free_port()
    b = backend(f"http://127.0.0.1:{port}/v1")
    waits: list[float] = []
    servers = []

    def sleep(s: float) -> None:
        waits.append(s)
        if len(waits) == 3:  # the server comes up during the third wait
            servers.append(CannedServer(WITH, port=port).__enter__())

    try:
        p = ensure_signals(b, Needs(signals=("mean_logprob",)), sleep=sleep, max_delay=3)
    finally:
        for s in servers:
            s.__exit__()
    assert waits == [1, 2, 3] and p.status == "ok"


def test_past_the_wait_the_worker_serves_unverified_and_judges_the_server_once_it_answers():
    # a server still down after PREFLIGHT_WAIT: the worker serves (its jobs fall back meanwhile) and probes
    # in the background; a server that then answers without log-probs is refused as at the start
    port = free_port()
    b = backend(f"http://127.0.0.1:{port}/v1")
    needs = Needs(signals=("min_logprob",))
    assert ensure_signals(b, needs, wait=0).status == "unreachable"
    for body, refused in ((WITHOUT, True), (WITH, False)):
        said: list[str] = []
        servers = []

        def sleep(s: float) -> None:
            if not servers:
                servers.append(CannedServer(body, port=port).__enter__())

        try:
            verify_later(b, needs, allow_missing=False, refuse=said.append, sleep=sleep).join(30)
        finally:
            servers[0].__exit__()
        assert bool(said) is refused and (not said or "'min_logprob'" in said[0])


def test_a_server_that_refuses_the_probe_is_refused_with_its_error():
    with CannedServer({"error": {"message": "model 'm' not found"}}, status=404) as srv:
        with pytest.raises(PreflightRefused, match=r"HTTP 404: model 'm' not found"):
            ensure_signals(backend(srv.base_url), Needs(signals=("min_logprob",)))


def test_nothing_to_probe_when_the_policy_reads_no_signal_there():
    b = backend(f"http://127.0.0.1:{free_port()}/v1")  # nothing listens: never called
    assert probe(b, Needs()).status == "skipped"


def test_a_decision_without_its_signal_is_reported_in_its_reason_and_counted(tmp_path):
    from prometheus_client import REGISTRY

    from router.core.portfolio import parse_portfolio
    from worker.config.settings import Settings
    from worker.queue.run import run_batch

    def count():
        return REGISTRY.get_sample_value("cascade_signal_missing_total", {"tier": "cheap", "signal": "min_logprob"}) or 0

    before = count()
    with CannedServer(WITHOUT) as cheap, CannedServer(WITH) as top:
        pf = parse_portfolio({"policy": {"name": "threshold", "signal": "min_logprob"}, "tiers": [
            {"name": "cheap", "threshold": -1.0, "backend": {"kind": "openai", "base_url": cheap.base_url, "model": "m"}},
            {"name": "top", "backend": {"kind": "openai", "base_url": top.base_url, "model": "m"}}]}, where="test")
        # the embedded workers run the tier worker's preflight: refused unless started degraded
        with pytest.raises(PreflightRefused, match=r"tier 'cheap' \(openai backend, .*\): the policy reads "
                                                   r"'min_logprob' at this tier"):
            run_batch([{"id": "a", "prompt": "2+2?"}], pf, settings=Settings(broker_url=None, database_url=None,
                      home=tmp_path / "refused"), batch_id="refused", progress=False, timeout=60)
        rep = run_batch([{"id": "a", "prompt": "2+2?"}, {"id": "b", "prompt": "3+3?"}], pf,
                        settings=Settings(broker_url=None, database_url=None, home=tmp_path,
                                          allow_missing_signals=True), batch_id="miss",
                        progress=False, timeout=60)
    for job in rep.jobs:
        first = job["attempts"][0]
        assert first["decision"] == "escalate" and first["reason"].startswith("min_logprob missing [min_logprob not "
                                                                              "in the answer: ")
        assert f"{cheap.base_url} sent no token log-probs although they were asked for" in first["reason"]
        assert first["meta"]["missing_signals"] == ["min_logprob"] and first["meta"]["logprobs_missing"]
        assert job["final_tier"] == "top" and "missing_signals" not in job["attempts"][1]["meta"]
    assert count() - before == 2


def test_cascade_check_probes_every_tier(tmp_path):
    from worker.cli import cli

    with CannedServer(WITHOUT) as bare, CannedServer(WITH) as good:
        path = tmp_path / "p.toml"
        path.write_text(f'''[policy]
name = "threshold"
signal = "min_logprob"

[[tiers]]
name = "cheap"
threshold = -1.0
backend = {{ kind = "openai", base_url = "{bare.base_url}", model = "small" }}

[[tiers]]
name = "top"
backend = {{ kind = "openai", base_url = "{good.base_url}", model = "big" }}
''')
        r = CliRunner().invoke(cli, ["check", "--portfolio", str(path)])
        rj = CliRunner().invoke(cli, ["check", "--portfolio", str(path), "--json", "--tier", "top"])
    print(r.output)
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert lines[0].startswith("missing     tier 'cheap' (openai backend, " + bare.base_url)
    assert lines[1].startswith("ok          tier 'top'") and "min_logprob=-0.1" in lines[1]
    assert rj.exit_code == 0 and json.loads(rj.output)["status"] == "ok"
    assert load_portfolio(path).tier("cheap")


@pytest.mark.services
def test_a_tier_worker_refuses_to_start_on_a_server_without_logprobs_unless_told(distributed, workers, tmp_path):
    settings, _ = distributed
    with CannedServer(WITHOUT) as srv:
        path = tmp_path / "p.toml"
        path.write_text(f'[policy]\nname = "threshold"\nsignal = "min_logprob"\n\n[[tiers]]\nname = "cheap"\n'
                        f'threshold = -1.0\nbackend = {{ kind = "openai", base_url = "{srv.base_url}", model = "m" }}\n'
                        f'\n[[tiers]]\nname = "top"\nbackend = {{ kind = "openai", base_url = "{srv.base_url}", '
                        f'model = "m" }}\n')
        w = workers(path)
        refused = w.start("cheap")
        assert refused.wait(60) == 1
        log = w.logs()
        assert "tier 'cheap'" in log and "'min_logprob'" in log and srv.base_url in log and "Fix:" in log, log
        degraded = w.start("cheap", "--allow-missing-signals")
        deadline = time.time() + 60
        while "preflight.degraded" not in w.logs() and time.time() < deadline and degraded.poll() is None:
            time.sleep(0.5)
        assert degraded.poll() is None, w.logs()
        assert "preflight.degraded" in w.logs()
