"""Signal preflight: does a tier's backend return every signal its policy reads?

A policy declares what it reads at each tier (`policy.needs(i)`); `Backend.check_needs`
checks that the backend *kind* can produce it. Whether the *server* does is another
matter: llama-cpp-python's server answers `"logprobs": null` unless `top_logprobs` is
sent, some hosted APIs never return log-probs, and a threshold cascade whose signal
is always missing escalates every job, silently. So, before a tier worker consumes
anything (and in `cascade check`), one small probe goes to each tier: a short
question (`PROBE_PROMPT`, a few tokens), with the tier's own needs, its live-signal
extra calls included, and the answer's signals are computed as the stage computes
them (`router.core.signals.from_tokens`, `worker.models.extra_calls`). Outcomes:

- `ok`: every signal is there;
- `unread`: the server sent what the signals need, but this probe's answer did not
  yield one (an empty answer, a verdict that says neither yes nor no): a property of
  the model's text on one question, not of the server; warned, not refused;
- `missing`: the server did not send what a signal needs (no token log-probs, no
  alternatives of the verdict token): the worker refuses to start with a message
  naming the tier, the signal, the server and the fix, unless started with
  `--allow-missing-signals` (then it runs degraded, loudly: every decision without
  the signal is logged and counted, `cascade_signal_missing_total`);
- `unreachable`: a transient failure (no connection, a timeout, a 5xx): the server
  may be starting; the worker waits for it, with backoff, logging each try
  (`wait_for_probe`), never exits (no crash loop while a model server loads);
- `failed`: the server answered with an error that is not transient (a 4xx: unknown
  model, bad key): refused with that error;
- `skipped`: nothing to verify (the policy reads no signal at this tier) or nothing
  live to ask (a replay tier serves recorded signals).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import structlog

from router.core import signals as sig
from router.core.attempt import Query
from router.core.errors import UserError
from router.core.live_signals import CALLS_FOR
from router.core.policy import Needs
from router.core.signals import TOKEN_SIGNALS
from worker.models.backends import build_backend
from worker.models.backends.base import (
    Backend,
    BackendConfigError,
    BackendFailure,
    BackendResult,
    TransientBackendError,
)
from worker.models.extra_calls import with_extra_calls

PROBE_ID = "cascade-preflight"
PROBE_PROMPT = "What is 2 + 2?"
PROBE_TOKENS = 8

HARD = ("missing", "failed")

log = structlog.get_logger("cascade.preflight")


@dataclass
class Probe:
    tier: str
    kind: str
    server: str
    needs: Needs
    status: str  # ok | unread | missing | unreachable | failed | skipped
    signals: dict[str, float] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # the server did not send what these need
    unread: list[str] = field(default_factory=list)  # sent, but this probe's answer did not yield them
    why: dict[str, str] = field(default_factory=dict)  # signal -> what was lacking
    error: str | None = None
    answer: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status not in HARD and self.status != "unreachable"

    def message(self) -> str:
        """One paragraph for an operator: the tier, the signal, the server, the fix."""
        head = f"tier {self.tier!r} ({self.kind} backend, {self.server})"
        if self.status == "skipped":
            return f"{head}: {self.error or 'nothing to verify'}"
        if self.status == "ok":
            got = ", ".join(f"{s}={self.signals[s]:.4g}" for s in self.needs.signals if s in self.signals)
            return f"{head}: ok, the probe's answer carries {got or 'what the policy reads'}"
        if self.status == "unreachable":
            return f"{head}: not reachable yet: {self.error}"
        if self.status == "failed":
            return (f"{head}: the probe failed: {self.error}. Fix the tier's backend options (model name, key, "
                    f"endpoint) or the server")
        parts = []
        for s in self.missing:
            parts.append(f"the policy reads {s!r} at this tier, but {self.why.get(s, 'the answer lacks it')}")
        text = f"{head}: " + "; ".join(parts) if parts else head
        if self.missing:
            text += f". Fix: {fix_for(self)}"
        if self.unread:
            text += ("; " if self.missing else ": ") + ", ".join(
                f"{s!r} not read from this probe's answer ({self.why.get(s, 'the answer did not yield it')})"
                for s in self.unread)
        return text


def fix_for(p: Probe) -> str:
    tokens = [s for s in p.missing if s in TOKEN_SIGNALS]
    out = []
    if tokens and p.kind == "openai":
        out.append("serve the model with a server that returns token log-probs (vLLM, llama.cpp's llama-server "
                   "and llama-cpp-python's server do) or try the tier's endpoint = \"completions\"")
    elif tokens:
        out.append("use a backend that returns token log-probs")
    if "p_true" in p.missing:
        out.append("serve the model with a server that returns top_logprobs")
    out.append("or read a signal the model's text gives (p_verify, self_ref, neg_semantic_entropy); "
               "`cascade worker --allow-missing-signals` starts it degraded (such decisions are logged and counted "
               "in cascade_signal_missing_total; a threshold cascade escalates them all)")
    return ", ".join(out)


def server_of(backend: Backend) -> str:
    for attr in ("base_url", "path", "model_name"):
        v = getattr(backend, attr, None)
        if v:
            return str(v)
    return backend.kind


def probe_query(backend: Backend) -> Query:
    q = Query(PROBE_ID, PROBE_PROMPT, params={"max_tokens": PROBE_TOKENS})
    if backend.refuses(backend.tier, q) is not None:
        q = Query(PROBE_ID, PROBE_PROMPT)
    return q


def probe(backend: Backend, needs: Needs) -> Probe:
    """One probe of this tier's backend with the policy's needs at the tier."""
    tier = backend.tier.name
    p = Probe(tier, backend.kind, server_of(backend), needs, "ok")
    if not needs.signals:
        p.status, p.error = "skipped", "the policy reads no signal at this tier"
        return p
    if not backend.live:
        p.status, p.error = "skipped", f"a {backend.kind} tier serves recorded signals"
        return p
    started = time.perf_counter()
    q = probe_query(backend)
    try:
        r = with_extra_calls(backend, q, needs, backend.generate(q, needs))
    except TransientBackendError as e:
        p.status, p.error = "unreachable", str(e)
        return p
    except BackendFailure as e:
        p.status, p.error = "failed", str(e)
        return p
    finally:
        p.seconds = time.perf_counter() - started
    p.answer = r.text
    p.signals = sig.from_tokens(r.tokens, r.stop) if r.tokens else {}
    p.signals.update({k: v for k, v in r.signals.items() if sig.get(r.signals, k) is not None})
    for s in needs.signals:
        if sig.get(p.signals, s) is not None:
            continue
        hard, why = _lacking(s, r, needs, p.server)
        (p.missing if hard else p.unread).append(s)
        p.why[s] = why
    p.status = "missing" if p.missing else "unread" if p.unread else "ok"
    return p


def _lacking(signal: str, r: BackendResult, needs: Needs, server: str) -> tuple[bool, str]:
    """Whether the server is at fault for a missing signal (hard), and what was lacking."""
    if signal in TOKEN_SIGNALS:
        if not r.tokens:
            return True, (f"{server} answered the probe without token log-probs"
                          + (" although they were asked for" if r.meta.get("logprobs_missing") else ""))
        if signal == "neg_entropy" and not any(t.top for t in r.tokens):
            return True, f"{server} sent no alternatives per token (top_logprobs), which {signal} needs"
        return False, f"the probe's answer {r.text!r} has no answer tokens to read"
    calls = (r.meta.get("extra_calls") or {}).get("outputs") or {}
    if signal == "p_true":
        verdict = (calls.get("p_true") or [{}])[0]
        if not verdict.get("top_logprobs"):
            return True, f"{server} sent no alternatives of the verdict token (top_logprobs), which p_true reads"
        return False, f"the verdict {verdict.get('text')!r} says neither yes nor no among its alternatives"
    if signal in CALLS_FOR:
        texts = [c.get("text") for c in calls.get(CALLS_FOR[signal], [])]
        return False, f"the model's replies {texts!r} could not be read"
    return True, "the backend did not return it"


def wait_for_probe(backend: Backend, needs: Needs, *, on_wait: Callable[[Probe, float], Any] | None = None,
                   sleep: Callable[[float], Any] = time.sleep, first_delay: float = 1.0, max_delay: float = 30.0,
                   deadline: float | None = None) -> Probe:
    """Probe until the server is reachable (doubling waits up to `max_delay`, `on_wait`
    told of each), then return the probe; with `deadline` (seconds), the last
    `unreachable` probe once it has passed."""
    delay = first_delay
    started = time.monotonic()
    while True:
        p = probe(backend, needs)
        if p.status != "unreachable" or (deadline is not None and time.monotonic() - started + delay > deadline):
            return p
        if on_wait is not None:
            on_wait(p, delay)
        sleep(delay)
        delay = min(delay * 2, max_delay)


class PreflightRefused(UserError):
    """A tier's server cannot give what its policy reads: the worker does not start."""


def ensure_signals(backend: Backend, needs: Needs, *, allow_missing: bool = False, wait: float | None = None,
                   on_wait: Callable[[Probe, float], Any] | None = None, sleep: Callable[[float], Any] = time.sleep,
                   max_delay: float = 30.0) -> Probe:
    """A tier worker's start: wait for its server (logged, with backoff; at most `wait`
    seconds, None = as long as it takes), then refuse (PreflightRefused) if the answer
    lacks a signal the policy reads, or, with `allow_missing`, start degraded with an
    error logged; a signal the server sent but the probe's answer did not yield is a
    warning. A server still unreachable after `wait` is returned as such (`unreachable`):
    the caller starts without the probe (its jobs fall back meanwhile) and verifies later
    (`verify_later`)."""

    def waiting(p: Probe, delay: float) -> None:
        log.warning("preflight.waiting", tier=p.tier, server=p.server, error=p.error, retry_in_s=delay)
        if on_wait is not None:
            on_wait(p, delay)

    p = wait_for_probe(backend, needs, on_wait=waiting, sleep=sleep, max_delay=max_delay, deadline=wait)
    return judge(p, allow_missing=allow_missing)


def judge(p: Probe, *, allow_missing: bool) -> Probe:
    """Log a probe's outcome; raise PreflightRefused for a server that cannot give what
    the policy reads (unless `allow_missing`) or that refused the probe."""
    if p.status == "failed":
        raise PreflightRefused(p.message())
    if p.status == "missing":
        if not allow_missing:
            raise PreflightRefused(f"{p.message()}. The worker does not start: every decision at this tier would "
                                   f"be taken without {', '.join(p.missing)}")
        log.error("preflight.degraded", tier=p.tier, server=p.server, signals=p.missing, message=p.message(),
                  note="started with --allow-missing-signals: decisions without these signals are counted in "
                       "cascade_signal_missing_total")
    elif p.status == "unread":
        log.warning("preflight.unread", tier=p.tier, server=p.server, signals=p.unread, message=p.message())
    elif p.status == "unreachable":
        log.error("preflight.unverified", tier=p.tier, server=p.server, error=p.error,
                  note="the server is still unreachable: the worker starts without the probe (its jobs fall back "
                       "to the next tier while the server is down) and probes again in the background")
    elif p.status == "ok":
        log.info("preflight.ok", tier=p.tier, server=p.server, signals=list(p.needs.signals),
                 seconds=round(p.seconds, 3))
    return p


def verify_later(backend: Backend, needs: Needs, *, allow_missing: bool, refuse: Callable[[str], Any],
                 sleep: Callable[[float], Any] = time.sleep, max_delay: float = 30.0) -> threading.Thread:
    """For a worker that started while its server was unreachable: probe in the
    background until the server answers, then judge it as at start; a refusal calls
    `refuse` with the message (the worker stops; restarted, its preflight refuses)."""

    def run() -> None:
        p = wait_for_probe(backend, needs, sleep=sleep, max_delay=max_delay)
        try:
            judge(p, allow_missing=allow_missing)
        except PreflightRefused as e:
            log.error("preflight.refused", tier=p.tier, server=p.server, message=str(e))
            refuse(str(e))

    t = threading.Thread(target=run, name=f"preflight-{backend.tier.name}", daemon=True)
    t.start()
    return t


def check_portfolio(portfolio, tiers: list[str] | None = None, *, wait: float = 0.0,
                    on_wait: Callable[[Probe, float], Any] | None = None) -> list[Probe]:
    """`cascade check`: build each tier's backend (a local model loads), check that its
    kind can produce what the policy reads there, and probe it once (waiting up to
    `wait` seconds for a server not reachable yet). A tier whose backend cannot be built
    is a `failed` probe naming why."""
    policy = portfolio.built_policy
    out = []
    for i, tier in enumerate(portfolio.tiers):
        if tiers and tier.name not in tiers:
            continue
        needs = policy.needs(i)
        try:
            backend = build_backend(tier)
        except BackendConfigError as e:
            out.append(Probe(tier.name, tier.backend.kind, tier.backend.kind, needs, "failed", error=str(e)))
            continue
        try:
            backend.check_needs(needs)
            out.append(wait_for_probe(backend, needs, on_wait=on_wait, deadline=wait, max_delay=10.0))
        except BackendConfigError as e:
            out.append(Probe(tier.name, backend.kind, server_of(backend), needs, "failed", error=str(e)))
        finally:
            backend.close()
    return out


def both_needs(a: Needs, b: Needs) -> Needs:
    """What two policies read at a tier, together (a worker serving jobs of both probes for it)."""
    return Needs(signals=tuple(dict.fromkeys(a.signals + b.signals)), logprobs=a.logprobs or b.logprobs,
                 top_logprobs=max(a.top_logprobs, b.top_logprobs), samples=max(a.samples, b.samples),
                 verify=a.verify or b.verify)
