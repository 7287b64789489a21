"""speculative backend: a speculative cascade of two local models sharing one tokenizer.

The drafter (default: the pack's small model, Qwen2.5-Coder-0.5B) proposes a block of
`gamma` tokens greedily; the verifier (default: medium, Qwen2.5-Coder-1.5B) scores the
whole block in one forward pass (one llama.cpp decode of the block with the logits of
every position); at each position the deferral rule (`router.core.speculative`:
chow, diff, opt, always, never) decides whether the token is the drafter's or the
verifier's. The first position where the verifier's token replaces the draft ends
the block; both models' KV caches are rolled back to the accepted tokens and
drafting goes on from there. When every draft of a block stands, one more token is
decided from the distributions both models computed after the block's last draft
(so a block yields up to gamma + 1 tokens per verifier pass).

Options (portfolio `[tiers.backend]`):
  drafter, verifier  pack names or pack model names (default small, medium); the two
                     must share one vocabulary
  gamma              tokens drafted per block (default 4)
  rule               chow | diff | opt | always | never (default opt)
  alpha              the rule's parameter (default 0.3; see router/core/speculative.py)
  drafter_price      {input_per_mtok, output_per_mtok}: the drafter's tokens at this
                     price (default: the tier's price, like the verifier's)
  and, passed to both models as the llamacpp backend reads them: n_ctx, n_threads,
  n_batch, max_tokens, stop, mode, prompt_template, system, top_logprobs, warm_prefix.

Greedy decoding only. The loading, prompt building (prompt_template, chat template),
thread settings and the one shared llama.cpp compute thread are the llamacpp
backend's: each model is a LlamaCppBackend built from this tier's options.

What a call returns: the text; per emitted token its log-probability under the
distribution it was taken from (the drafter's where the rule kept the draft, the
verifier's where it deferred), with top-k alternatives from that same distribution;
tokens_in = the prompt's tokens, tokens_out = the emitted tokens; and a cost that
counts both models' work: each model reads the prompt (input price), the drafter
generates every drafted token and the verifier scores every block position, kept or
thrown away (output price). meta carries the counts: drafted, accepted, deferred,
corrected, blocks (verifier passes).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from router.core.attempt import Query, TokenLogprob
from router.core.policy import Needs
from router.core.portfolio import BackendSpec, Price, Tier
from router.core.speculative import DeferralRule, SpeculativeError, decide_block, log_softmax
from worker.models.backends.base import (
    Backend,
    BackendConfigError,
    BackendFailure,
    BackendResult,
    answer_limit,
    input_bound,
    option,
    reject_unknown_options,
)
from worker.models.backends.llamacpp import LlamaCppBackend, _import_llama

_OWN = {"drafter", "verifier", "gamma", "rule", "alpha", "drafter_price", "temperature"}
_SHARED = {"n_ctx", "n_threads", "n_batch", "max_tokens", "stop", "mode", "prompt_template", "system",
           "top_logprobs", "warm_prefix"}


def _model_tier(tier: Tier, role: str, model: str) -> Tier:
    shared = {k: v for k, v in tier.backend.options.items() if k in _SHARED}
    # cpu_lock: both models on the one shared llama.cpp thread, where this backend's loop runs; the prefix is
    # warmed by this backend (into the KV cache its own loop reads), not by the llamacpp backend's decoder
    spec = BackendSpec.model_validate({"kind": "llamacpp", "model": model, "cpu_lock": True, **shared,
                                       "warm_prefix": False})
    return Tier(name=f"{tier.name}.{role}", backend=spec, price=tier.price)


class SpeculativeBackend(Backend):
    kind = "speculative"
    capabilities = frozenset({"logprobs", "top_logprobs"})
    pool = "solo"

    @classmethod
    def check_options(cls, tier: Tier) -> None:
        cls._settings(tier)

    @classmethod
    def _settings(cls, tier: Tier) -> tuple[str, str, int, DeferralRule, Price]:
        reject_unknown_options(tier, _OWN | _SHARED)
        drafter = option(tier, "drafter", str, "small")
        verifier = option(tier, "verifier", str, "medium")
        gamma = option(tier, "gamma", int, 4)
        if not 1 <= gamma <= 32:
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'gamma' must be in 1..32, got {gamma}")
        if option(tier, "temperature", (int, float), 0) != 0:
            raise BackendConfigError(f"tier {tier.name!r}: the speculative backend decodes greedily only "
                                     f"(temperature 0)")
        try:
            rule = DeferralRule(option(tier, "rule", str, "opt"), float(option(tier, "alpha", (int, float), 0.3)))
        except SpeculativeError as e:
            raise BackendConfigError(f"tier {tier.name!r}: {e}") from None
        raw_price = option(tier, "drafter_price", dict, None)
        try:
            price = tier.price if raw_price is None else Price.model_validate(raw_price)
        except ValueError as e:
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'drafter_price': {e}") from None
        n_batch = option(tier, "n_batch", int, 256)
        if gamma + 1 > n_batch:
            raise BackendConfigError(f"tier {tier.name!r}: gamma + 1 = {gamma + 1} positions are scored in one "
                                     f"batch, more than n_batch = {n_batch}")
        return drafter, verifier, gamma, rule, price

    @classmethod
    def refuses(cls, tier: Tier, query: Query) -> str | None:
        if query.params.get("temperature"):
            return "params.temperature"  # greedy only
        return LlamaCppBackend.refuses(tier, query)

    def __init__(self, tier: Tier):
        super().__init__(tier)
        drafter, verifier, self.gamma, self.rule, self.drafter_price = self._settings(tier)
        self.drafter = LlamaCppBackend(_model_tier(tier, "drafter", drafter))
        try:
            self.verifier = LlamaCppBackend(_model_tier(tier, "verifier", verifier))
        except BaseException:
            self.drafter.close()
            raise
        d, v = self.drafter, self.verifier
        self.n_vocab = v._llm.n_vocab()
        if d._llm.n_vocab() != self.n_vocab:
            self.close()
            raise BackendConfigError(f"tier {tier.name!r}: drafter {d.model_name} and verifier {v.model_name} do not "
                                     f"share a vocabulary ({d._llm.n_vocab()} vs {self.n_vocab} tokens)")
        self.max_tokens, self.stop, self.n_ctx = v.max_tokens, v.stop, v.n_ctx
        self.top_k_default = v.top_k_default
        self.model_name = f"{d.model_name}>{v.model_name}"
        self._compute = v._compute
        llama_cpp = _import_llama()
        self._logits_ith = llama_cpp.llama_get_logits_ith
        self._is_eog = llama_cpp.llama_vocab_is_eog
        template = option(tier, "prompt_template", str, None)
        if template and option(tier, "warm_prefix", bool, True):
            self._compute.run(self._warm, template.split("{prompt}", 1)[0])

    def _warm(self, prefix: str) -> None:
        for llm in (self.drafter._llm, self.verifier._llm):
            tokens = llm.tokenize(prefix.encode("utf-8"), add_bos=True, special=False)
            if 1 < len(tokens) < self.n_ctx:
                llm.reset()
                llm.eval(tokens[:-1])  # the last token may merge with the prompt's first

    def _logits(self, llm, i: int) -> np.ndarray:
        return np.ctypeslib.as_array(self._logits_ith(llm.ctx, i), shape=(self.n_vocab,)).copy()

    def _eog(self, token: int) -> bool:
        return bool(self._is_eog(self.verifier._llm._model.vocab, token))

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "rule": self.rule.name, "alpha": self.rule.alpha, "gamma": self.gamma,
                "n_ctx": self.n_ctx}

    def close(self) -> None:
        for b in (getattr(self, "drafter", None), getattr(self, "verifier", None)):
            if b is not None:
                b.close()

    def generate(self, query: Query, needs: Needs) -> BackendResult:
        self.check_request(query)
        top_k = max(needs.top_logprobs, self.top_k_default)
        return self._compute.run(self._generate, query, top_k)

    # -- on the compute thread -------------------------------------------------------
    def _generate(self, query: Query, top_k: int) -> BackendResult:
        d, v = self.drafter._llm, self.verifier._llm
        if d is None or v is None:
            raise BackendFailure(f"tier {self.tier.name!r}: the model {self.model_name} was closed")
        p = query.params
        max_tokens = p.get("max_tokens", self.max_tokens)
        stops = self.stop if p.get("stop") is None else tuple(p["stop"])
        started = time.perf_counter()
        prompt = self.drafter._prompt_tokens(query)
        n_prompt = len(prompt)
        room = self.n_ctx - n_prompt - self.gamma - 1
        if room < 1:
            raise BackendFailure(
                f"prompt too long: {n_prompt} tokens, but tier {self.tier.name!r} runs with a context of "
                f"{self.n_ctx} tokens (backend option n_ctx) and drafts {self.gamma} tokens past it; shorten the "
                f"prompt or raise n_ctx")
        budget = min(max_tokens, room)
        counts = {"drafted": 0, "accepted": 0, "deferred": 0, "corrected": 0, "blocks": 0}
        try:
            for llm in (d, v):  # keep the longest shared prefix (a few-shot block) in each KV cache
                llm.n_tokens = min(_common_prefix(llm.input_ids[: llm.n_tokens].tolist(), prompt), n_prompt - 1)
            ctx = list(prompt)
            out: list[int] = []
            toks: list[TokenLogprob] = []
            text, finished = "", False
            while not finished and len(out) < budget:
                g = min(self.gamma, budget - len(out) - 1)
                drafts, q_rows = self._draft(d, ctx, g)
                p_rows = self._score(v, ctx, drafts[:g])
                block = decide_block(log_softmax(q_rows), log_softmax(p_rows), self.rule, drafts)
                counts["blocks"] += 1
                counts["drafted"] += g + 1
                kept = 0
                for pos in block:
                    counts["deferred"] += pos.deferred
                    counts["corrected" if pos.corrected else "accepted"] += 1
                    toks.append(TokenLogprob(self.verifier._piece(pos.token), pos.logprob, _top(self, pos.logprobs, top_k)))
                    if self._eog(pos.token):
                        finished = True
                        break
                    out.append(pos.token)
                    kept += not pos.corrected
                    text = v.detokenize(out, prev_tokens=prompt).decode("utf-8", errors="ignore")
                    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        text, finished = text[:cut], True
                        break
                    if len(out) >= budget:
                        break
                # both caches hold ctx + the g drafts: keep ctx + the drafts that stood
                keep = len(ctx) + min(kept, g)
                d.n_tokens, v.n_tokens = min(d.n_tokens, keep), min(v.n_tokens, keep)
                ctx = list(prompt) + out
        except BackendFailure:
            raise
        except Exception as e:  # a decode failure must not take the worker down
            d.reset()
            v.reset()
            raise BackendFailure(f"speculative decoding failed on this prompt with {self.model_name}: "
                                 f"{type(e).__name__}: {e}") from None
        latency_ms = (time.perf_counter() - started) * 1000
        dp, vp = self.drafter_price, self.tier.price
        # both models read the prompt; the drafter generates every drafted token and the verifier scores as many
        cost = (n_prompt * (dp.input_per_mtok + vp.input_per_mtok) + counts["drafted"] * dp.output_per_mtok
                + counts["drafted"] * vp.output_per_mtok) / 1e6 + vp.per_call
        return BackendResult(
            text=text.strip(), tokens=toks, stop=stops, tokens_in=n_prompt, tokens_out=len(toks),
            latency_ms=latency_ms, cost_usd=cost,
            meta={"finish_reason": "stop" if finished else "length", "model": self.model_name, **counts,
                  "rule": self.rule.name, "alpha": self.rule.alpha, "gamma": self.gamma},
        )

    @classmethod
    def max_cost(cls, tier: Tier, query: Query) -> float:
        """Both models read the prompt; the drafter drafts at most gamma tokens per token
        emitted and the verifier scores as many (see `generate`'s cost)."""
        raw = option(tier, "drafter_price", dict, None)
        dp, vp = (tier.price if raw is None else Price.model_validate(raw)), tier.price
        drafted = option(tier, "gamma", int, 4) * answer_limit(tier, query)
        n_prompt = input_bound(tier, query)
        return (n_prompt * (dp.input_per_mtok + vp.input_per_mtok)
                + drafted * (dp.output_per_mtok + vp.output_per_mtok)) / 1e6 + vp.per_call

    def _draft(self, llm, ctx: list[int], g: int) -> tuple[list[int], np.ndarray]:
        """The drafter's g + 1 greedy tokens after ctx, with its distribution at each."""
        llm.eval(ctx[llm.n_tokens:])
        rows = np.empty((g + 1, self.n_vocab), dtype=np.float32)
        drafts: list[int] = []
        for i in range(g + 1):
            if i:
                llm.eval([drafts[-1]])
            rows[i] = self._logits(llm, -1)
            drafts.append(int(rows[i].argmax()))
        return drafts, rows

    def _score(self, llm, ctx: list[int], drafts: list[int]) -> np.ndarray:
        """The verifier's distribution after ctx and after each draft: len(drafts) + 1 rows, one decode."""
        pending = ctx[llm.n_tokens:]
        if len(pending) > 1:
            llm.eval(pending[:-1])  # the prompt's unseen part (chunked by n_batch)
        block = pending[-1:] + drafts
        n_past = llm.n_tokens
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
        llm._batch.set_batch(batch=block, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        llm.input_ids[n_past: n_past + len(block)] = block
        llm.n_tokens = n_past + len(block)
        return np.stack([self._logits(llm, i) for i in range(len(block))])


def _top(b: SpeculativeBackend, logprobs: np.ndarray, k: int) -> dict[str, float]:
    if not k:
        return {}
    idx = np.argpartition(-logprobs, k)[:k] if k < len(logprobs) else np.arange(len(logprobs))
    top: dict[str, float] = {}
    for i in idx[np.argsort(-logprobs[idx])]:
        top.setdefault(b.verifier._piece(int(i)), float(logprobs[i]))
    return top


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n

