"""openai backend: any server that speaks the OpenAI API (OpenAI, vLLM, llama.cpp's
server, llama-cpp-python's server, Ollama, LiteLLM, OpenRouter, ...).

One HTTP request per `generate`. What goes wrong is sorted for the stage task:
- 429, 408 and 5xx answers, timeouts, refused or dropped connections raise
  TransientBackendError (with the server's Retry-After, if any): the pipeline
  retries them with backoff (CASCADE_BACKEND_RETRIES, CASCADE_BACKEND_RETRY_BACKOFF)
  and then falls back to the next tier, recording the error in the attempt;
- other 4xx answers (bad request, prompt too long, unknown model, bad key) and
  answers that are not OpenAI-shaped raise BackendFailure: not retried.
Every message names the server's address.

Options (portfolio `[tiers.backend]`):
  base_url         e.g. "http://127.0.0.1:8000/v1" or "https://api.openai.com/v1"
  model            the model name the server expects
  api_key_env      name of the secret holding the API key, read from the worker's
                   environment or its secrets file (worker.config.credentials; the key itself
                   never goes in the portfolio); unset = no Authorization
  endpoint         "chat" (default, /chat/completions) or "completions" (/completions)
  prompt_template  completions endpoint: text with {prompt} where the job's prompt goes
  system           chat endpoint: a system message
  max_tokens       default 256
  stop             stop sequences (string or list)
  temperature      default 0
  connect_timeout  seconds, default 5
  read_timeout     seconds, default 60
  logprobs         ask for token log-probs even when the policy does not (default false;
                   they are asked for whenever the tier's policy needs token signals)
  top_logprobs     alternatives per token to ask for (default 0; the policy may ask more).
                   On the chat endpoint a request for log-probs always carries
                   `top_logprobs` >= 1: llama-cpp-python's server (and lmdeploy) answer
                   `"logprobs": null` to `logprobs: true` alone
  retries          extra in-backend attempts on a transient error (default 0: the
                   pipeline already retries; raise it only when calling backends directly)
  backoff          first in-backend retry delay, doubled each time (default 0.5 s)
  max_backoff      cap of a delay, Retry-After included (default 30 s)
  headers          extra HTTP headers (a table of strings)
  concurrency      requests in flight at once per worker process (default 16): a stage
                   sends its jobs' requests together (generate_many), at most this many
                   open at a time across the process's stage threads; size it to what the
                   server serves at once (vLLM batches them) and to the provider's limits
  max_rps          requests started per second per worker process (default: no limit),
                   for an API with a request-rate limit
A 429 (or 503) with Retry-After pauses every request of the process to this server
for that long, not only the one that got it: its rate limit is respected by all.
base_url and header values may reference secrets as ${NAME} (expanded in the
worker); a credential written literally is blanked in everything stored or shown.
Usage (prompt/completion tokens) is recorded per attempt; the cost comes from the
tier's price, or from the server when it reports `usage.cost` (OpenRouter does).

Token log-probs are read in both shapes servers send: the chat shape
(`logprobs.content[]` with `token`, `logprob`, `top_logprobs[]`) and the legacy
completions shape (`logprobs.tokens`, `token_logprobs`, `top_logprobs` as {token:
logprob} maps), whichever endpoint answered. An answer without them, when they were
asked for, is marked (`meta["logprobs_missing"]`): the stage reports the decision
taken without its signal (worker.queue.stage), and the worker's preflight
(worker.models.preflight) refuses a server that never sends them.
This backend also serves `p_true` (capability "verify"): one extra call asks the
model whether its answer is correct and reads P(yes) from the verdict token's
alternatives (worker.models.extra_calls).
"""
from __future__ import annotations

import email.utils
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import httpx

from router.core.attempt import Query, TokenLogprob
from router.core.policy import Needs
from router.core.portfolio import Tier
from router.core.signals import TOKEN_SIGNALS
from worker.config.credentials import SecretError, expand, redact_text, redact_url, secret
from worker.job.request import system_of
from worker.models.backends.base import (
    Backend,
    BackendConfigError,
    BackendFailure,
    BackendResult,
    TransientBackendError,
    option,
    refused_field,
    reject_unknown_options,
)

_OPTIONS = {"base_url", "model", "api_key_env", "endpoint", "prompt_template", "system", "max_tokens", "stop",
            "temperature", "connect_timeout", "read_timeout", "logprobs", "top_logprobs", "retries", "backoff",
            "max_backoff", "headers", "concurrency", "max_rps"}
_TRANSIENT_STATUS = {408, 409, 425, 429}


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        secs = float(value)
        return max(0.0, secs) if math.isfinite(secs) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class OpenAIBackend(Backend):
    kind = "openai"
    capabilities = frozenset({"logprobs", "top_logprobs", "verify"})
    pool = "threads"
    stage_threads = 2

    def __init__(self, tier: Tier):
        super().__init__(tier)
        reject_unknown_options(tier, _OPTIONS)
        raw_url = option(tier, "base_url", str).rstrip("/")
        # base_url is what messages, attempts and logs show (credentials blanked);
        # the request goes to the URL with its ${NAME} secrets expanded
        self.base_url = redact_url(raw_url)
        if not raw_url.startswith(("http://", "https://")):
            raise BackendConfigError(f"tier {tier.name!r}: base_url must start with http:// or https://, "
                                     f"got {self.base_url!r}")
        self.model_name = option(tier, "model", str)
        self.endpoint = option(tier, "endpoint", str, "chat")
        if self.endpoint not in ("chat", "completions"):
            raise BackendConfigError(f"tier {tier.name!r}: endpoint must be 'chat' or 'completions', "
                                     f"got {self.endpoint!r}")
        path = "chat/completions" if self.endpoint == "chat" else "completions"
        self.url = f"{self.base_url}/{path}"
        self._post_url = f"{_secret(tier, expand, raw_url)}/{path}"
        self.template = option(tier, "prompt_template", str, None)
        if self.template is not None and "{prompt}" not in self.template:
            raise BackendConfigError(f"tier {tier.name!r}: prompt_template must contain {{prompt}}")
        if self.template is not None and self.endpoint == "chat":
            raise BackendConfigError(f"tier {tier.name!r}: prompt_template is for endpoint = \"completions\"; "
                                     f"with the chat endpoint use 'system'")
        self.system = option(tier, "system", str, None)
        self.max_tokens = option(tier, "max_tokens", int, 256)
        stop = option(tier, "stop", (list, str), [])
        self.stop = tuple([stop] if isinstance(stop, str) else stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise BackendConfigError(f"tier {tier.name!r}: stop must be non-empty strings")
        self.temperature = float(option(tier, "temperature", (int, float), 0.0))
        self.connect_timeout = float(option(tier, "connect_timeout", (int, float), 5.0))
        self.read_timeout = float(option(tier, "read_timeout", (int, float), 60.0))
        self.always_logprobs = option(tier, "logprobs", bool, False)
        self.top_k_default = option(tier, "top_logprobs", int, 0)
        self.retries = option(tier, "retries", int, 0)
        self.backoff = float(option(tier, "backoff", (int, float), 0.5))
        self.max_backoff = float(option(tier, "max_backoff", (int, float), 30.0))
        headers = option(tier, "headers", dict, {})
        for key, low in (("max_tokens", 1), ("connect_timeout", 0), ("read_timeout", 0), ("retries", 0),
                         ("backoff", 0), ("max_backoff", 0), ("top_logprobs", 0)):
            v = getattr(self, {"top_logprobs": "top_k_default"}.get(key, key.replace("-", "_")))
            if not v >= low or (key.endswith("timeout") and v <= 0):
                raise BackendConfigError(f"tier {tier.name!r}: backend option {key!r} must be "
                                         f"{'>' if key.endswith('timeout') else '>='} {low}, got {v}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise BackendConfigError(f"tier {tier.name!r}: headers must map strings to strings")
        self.headers = {"Content-Type": "application/json",
                        **{k: _secret(tier, expand, v) for k, v in headers.items()}}
        key_env = option(tier, "api_key_env", str, None)
        if key_env is not None:
            self.headers["Authorization"] = f"Bearer {_secret(tier, secret, key_env)}"
        self.concurrency = option(tier, "concurrency", int, 16)
        if not 1 <= self.concurrency <= 1024:
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'concurrency' must be in 1..1024, "
                                     f"got {self.concurrency}")
        max_rps = option(tier, "max_rps", (int, float), None)
        if max_rps is not None and not max_rps > 0:
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'max_rps' must be > 0, got {max_rps}")
        self.pacer = Pacer(max_rps)
        self.client = httpx.Client(
            timeout=httpx.Timeout(connect=self.connect_timeout, read=self.read_timeout, write=self.read_timeout,
                                  # a request waiting for a free connection waits for its turn in the
                                  # executor, not here: the pool never holds it up longer than a read
                                  pool=self.read_timeout),
            headers=self.headers,
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        # one pool per backend, so per worker process: every stage thread's requests share it
        self.executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"openai-{tier.name}")

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def generate_many(self, queries: Sequence[Query], needs: Needs) -> list[BackendResult | Exception]:
        """The queries' requests in flight together, at most `concurrency` at once in this
        process; each query gets its result, its BackendFailure, or the exception its call
        raised, in its place."""
        if len(queries) == 1:
            return super().generate_many(queries, needs)
        futures = [self.executor.submit(self.generate, q, needs) for q in queries]
        out: list[Any] = []
        for f in futures:
            try:
                out.append(f.result())
            except Exception as e:  # noqa: BLE001 - kept in its query's place; the stage sorts it
                out.append(e)
        return out

    @classmethod
    def stage_size(cls, tier: Tier, cap: int) -> int:
        # four rounds of `concurrency` requests: the server stays busy between messages
        concurrency = tier.backend.options.get("concurrency", 16)
        return min(cap, 4 * concurrency) if isinstance(concurrency, int) and concurrency > 0 else cap

    # -- the request ----------------------------------------------------------------
    @classmethod
    def refuses(cls, tier: Tier, query: Query) -> str | None:
        if tier.backend.options.get("endpoint", "chat") == "chat":
            return None
        # the legacy completions endpoint takes one text: no system prompt, no chat history
        return refused_field(query, frozenset({"max_tokens", "temperature", "stop"}), chat=False)

    def wants_logprobs(self, needs: Needs) -> bool:
        """Whether a request with these needs asks for token log-probs."""
        return (self.always_logprobs or needs.logprobs or max(needs.top_logprobs, self.top_k_default) > 0
                or any(s in TOKEN_SIGNALS for s in needs.signals))

    def payload(self, query: Query, needs: Needs) -> dict[str, Any]:
        top_k = max(needs.top_logprobs, self.top_k_default)
        want = self.wants_logprobs(needs)
        p = query.params
        body: dict[str, Any] = {"model": self.model_name, "max_tokens": p.get("max_tokens", self.max_tokens),
                                "temperature": p.get("temperature", self.temperature)}
        stop = self.stop_of(query)
        if stop:
            body["stop"] = list(stop)
        if self.endpoint == "chat":
            system = system_of(query.messages, p) or self.system
            turns = [m for m in query.messages if m["role"] != "system"] or [{"role": "user", "content": query.prompt}]
            body["messages"] = ([{"role": "system", "content": system}] if system else []) + [
                {"role": m["role"], "content": m["content"]} for m in turns]
            if want:
                body["logprobs"] = True
                # at least 1: some servers (llama-cpp-python's, lmdeploy) answer `"logprobs": null`
                # to `logprobs: true` alone; OpenAI and vLLM then add one alternative per token
                body["top_logprobs"] = max(top_k, 1)
        else:
            body["prompt"] = self.template.replace("{prompt}", query.prompt) if self.template else query.prompt
            if want:
                # legacy completions: logprobs=N asks for the sampled token plus N alternatives
                body["logprobs"] = max(top_k, 1)
        return body

    def stop_of(self, query: Query) -> tuple[str, ...]:
        stop = query.params.get("stop")
        return self.stop if stop is None else tuple(stop)

    def generate(self, query: Query, needs: Needs) -> BackendResult:
        self.check_request(query)
        body = self.payload(query, needs)
        delay = self.backoff
        tries = 0
        while True:
            try:
                r = self._once(body, self.stop_of(query))
                if "logprobs" in body and r.tokens is None:
                    r.meta["logprobs_missing"] = True  # asked for, not sent: reported, never silent
                return r
            except TransientBackendError as e:
                tries += 1
                if tries > self.retries:
                    raise
                wait = min(self.max_backoff, e.retry_after if e.retry_after is not None else delay)
                time.sleep(wait)
                delay *= 2

    def _once(self, body: dict[str, Any], stop: tuple[str, ...]) -> BackendResult:
        self.pacer.wait()
        started = time.perf_counter()
        try:
            resp = self.client.post(self._post_url, json=body)
        except httpx.ConnectTimeout:
            raise TransientBackendError(f"{self.url}: no connection within {self.connect_timeout:g}s "
                                        f"(connect_timeout)") from None
        except httpx.ConnectError as e:
            raise TransientBackendError(f"{self.url}: cannot connect to the server ({redact_text(str(e))})") from None
        except httpx.ReadTimeout:
            raise TransientBackendError(f"{self.url}: no answer within {self.read_timeout:g}s "
                                        f"(read_timeout)") from None
        except httpx.TimeoutException as e:
            raise TransientBackendError(f"{self.url}: timed out ({type(e).__name__})") from None
        except httpx.TransportError as e:  # connection dropped mid-answer, protocol error
            raise TransientBackendError(f"{self.url}: connection failed: {type(e).__name__}: {redact_text(str(e))}") from None
        latency_ms = (time.perf_counter() - started) * 1000
        if resp.status_code >= 400:
            detail = _error_detail(resp)
            msg = f"{self.url}: HTTP {resp.status_code}{': ' + detail if detail else ''}"
            if resp.status_code >= 500 or resp.status_code in _TRANSIENT_STATUS:
                wait = retry_after_seconds(resp.headers.get("retry-after"))
                if wait is not None and resp.status_code in (429, 503):
                    self.pacer.pause(min(wait, self.max_backoff))  # the server's limit holds for every request
                raise TransientBackendError(msg, retry_after=wait)
            raise BackendFailure(msg)
        try:
            data = resp.json()
            choice = data["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendFailure(f"{self.url}: the answer is not an OpenAI-style completion: "
                                 f"{resp.text[:200]!r}") from None
        try:
            if self.endpoint == "chat":
                text = (choice.get("message") or {}).get("content") or ""
            else:
                text = choice.get("text") or ""
            tokens = tokens_of(choice.get("logprobs"))
        except (KeyError, TypeError, ValueError) as e:
            raise BackendFailure(f"{self.url}: unreadable logprobs in the answer ({type(e).__name__}: {e})") from None
        usage = data.get("usage") or {}
        cost = usage.get("cost")
        return BackendResult(
            text=text.strip(),
            tokens=tokens,
            stop=stop,
            tokens_in=_int(usage.get("prompt_tokens")),
            tokens_out=_int(usage.get("completion_tokens")),
            latency_ms=latency_ms,
            cost_usd=float(cost) if isinstance(cost, (int, float)) and math.isfinite(cost) else None,
            meta={"finish_reason": choice.get("finish_reason"), "model": data.get("model") or self.model_name,
                  "server": self.base_url},
        )


class Pacer:
    """Spacing of one process's requests to one server: at most `rate` started per
    second (None: no limit), and none before a pause a server asked for is over."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self._lock = threading.Lock()
        self._next = 0.0  # monotonic time the next request may start

    def wait(self) -> None:
        with self._lock:
            t = time.monotonic()
            start = max(t, self._next)
            self._next = start + self.interval
        if start > t:
            time.sleep(start - t)

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._next = max(self._next, time.monotonic() + seconds)


def _secret(tier: Tier, how, value: str) -> str:
    try:
        return how(value, f"tier {tier.name!r}")
    except SecretError as e:
        raise BackendConfigError(str(e)) from None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _lp(v: Any) -> float:
    # a missing log-prob (null) becomes -inf, which the signals drop rather than average in
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("-inf")


def tokens_of(lp: Any) -> list[TokenLogprob] | None:
    """A choice's token log-probs in either shape a server sends, whatever the endpoint:
    the chat shape (`content[]`) or the legacy completions shape (`tokens`,
    `token_logprobs`, `top_logprobs`); None when it has none."""
    if not lp or not isinstance(lp, dict):
        return None
    if lp.get("content"):
        return _chat_tokens(lp)
    if lp.get("tokens"):
        return _completion_tokens(lp)
    return None


def _chat_tokens(lp: Any) -> list[TokenLogprob] | None:
    if not lp or not lp.get("content"):
        return None
    out = []
    for item in lp["content"]:
        top = {str(t["token"]): _lp(t.get("logprob")) for t in (item.get("top_logprobs") or [])}
        out.append(TokenLogprob(str(item["token"]), _lp(item.get("logprob")), top))
    return out


def _completion_tokens(lp: Any) -> list[TokenLogprob] | None:
    if not lp or not lp.get("tokens"):
        return None
    toks, lps = lp["tokens"], lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    out = []
    for i, tok in enumerate(toks):
        top = tops[i] if i < len(tops) else None
        if isinstance(top, list):  # alternatives as [{token, logprob}], as in the chat shape
            top = {t["token"]: t.get("logprob") for t in top if isinstance(t, dict) and "token" in t}
        out.append(TokenLogprob(str(tok), _lp(lps[i] if i < len(lps) else None),
                                {str(k): _lp(v) for k, v in (top if isinstance(top, dict) else {}).items()}))
    return out


def _error_detail(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:300]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err)[:300]
    if err:
        return str(err)[:300]
    if isinstance(data, dict) and data.get("detail"):
        return str(data["detail"])[:300]
    return resp.text.strip()[:300]
