"""Several prompts decoded together on one llama.cpp context, per-token log-probs kept per job.

The llamacpp backend hands a stage's jobs here as `DecodeJob`s; `ParallelDecoder.run` decodes
them as parallel sequences of one model (llama.cpp's batch API: every `llama_decode` call
carries the next token of each running sequence), so the model's weights are read once per
step for all of them instead of once per job. One job alone goes through the same loop:
there is one decode path.

- Slots: the context has `n_seq` sequence ids (`n_seq_max`), one per running job; more jobs
  than slots wait and take the first slot that frees up (continuous batching).
- KV cache: one stream of `n_ctx` cells per slot (`kv_unified = false`), so a job's prompt
  and answer always fit whatever the others hold. A new job starts in the free slot that
  shares the longest prompt prefix with it; when a busy slot holds a longer one (the
  few-shot block, while the first job of a message decodes), that slot's stream is copied
  over (`llama_memory_seq_cp` across streams: a memcpy) and trimmed to the prefix, so a
  few-shot block is evaluated once per worker, not once per job.
- Same numbers batched as alone (`exact`, the default): a job's logits must not depend on
  what else shares its `llama_decode` calls. With this llama.cpp build four things do:
  1. a unified KV cache interleaves the jobs' cells: one stream per slot instead;
  2. flash attention takes a split-KV path for single-token steps: off;
  3. attention over the float16 cache (K.q, then V.softmax) runs through llamafile's sgemm
     when a sequence has 2 or more tokens in the micro-batch, and through ggml_vec_dot_f16
     when it has one (sgemm declines a single column): two summation orders, 1 ulp apart in
     kq (4e-3 at |kq| = 47,000, Qwen's largest attention logits), enough to flip a greedy
     token later. llama.cpp cuts a batch of several sequences into micro-batches with the
     same token count per sequence, so a prompt batched with others is cut where the others'
     prompts end, and a prompt token can land alone in a micro-batch. Exact: a job's prompt
     goes in calls of its own, in chunks of at least 2 tokens (a cached prefix leaves at
     least 2 to evaluate), so every prompt token takes the sgemm path and every generated
     token (one per sequence per step, batched or not) the dot-product one;
  4. ggml's tiled k-quant matmul (8 or more activation columns) sums in another order
     than the per-column dot product (fewer): a process-wide switch, off for exact
     backends (`llamacpp.tiled_matmul_off`).
  The masked cells past a job's end then only add zeros. Without these, greedy answers of
  the 1.5B model diverged after a few tokens (log-prob differences up to 2.7).
- Log-probs: log-softmax of the job's logits row, read in place from llama.cpp's buffer
  (no copy of the vocabulary, float32 in one scratch array); top-k alternatives only when
  asked for.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from router.core.attempt import TokenLogprob


@dataclass
class DecodeJob:
    prompt: list[int]
    budget: int  # tokens to generate at most
    temperature: float = 0.0
    stops: tuple[str, ...] = ()
    top_k: int = 0
    # results
    tokens: list[TokenLogprob] = field(default_factory=list)
    text: str = ""
    finished: bool = False  # an end-of-generation token or a stop sequence (else: the budget ran out)
    error: str | None = None
    elapsed_ms: float = 0.0  # from its first prompt token to its last token
    compute_ms: float = 0.0  # its share of the decode calls it took part in
    # state
    _out: list[int] = field(default_factory=list)
    _bytes: bytearray = field(default_factory=bytearray)
    _fed: int = 0  # prompt tokens in the KV cache
    _next: int | None = None  # sampled token still to feed
    _slot: int = -1
    _started: float = 0.0


class DecodeError(RuntimeError):
    """llama.cpp refused a decode call: the jobs being decoded fail (clearing the cache
    loses their state), the jobs not yet started go on."""


class ParallelDecoder:
    """Owns one llama.cpp context of `n_seq` sequences on the model of a `llama_cpp.Llama`.

    The Llama's own context is replaced by this one (same threads and batch size), so the
    model's memory is allocated once; everything on it runs through `run`, on the caller's
    (compute) thread.
    """

    def __init__(self, llm, llama_cpp, *, n_seq: int, n_ctx: int, n_batch: int,
                 rng: Callable[[], np.random.Generator], exact: bool = True):
        from llama_cpp import _internals  # deferred: llama_cpp is optional (the `local` extra)

        self._lib = llama_cpp
        self._llm = llm
        self.n_seq, self.n_ctx, self.n_batch = n_seq, n_ctx, n_batch
        self.exact = exact
        # prompt tokens left to evaluate after a cached prefix: at least 2 when exact (module doc, point 3)
        self._tail = 2 if exact else 1
        params = type(llm.context_params).from_buffer_copy(llm.context_params)
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_ctx = n_ctx * n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        old, llm._ctx = llm._ctx, ctx
        old.close()
        llm.context_params = params
        llm._stack.enter_context(contextlib.closing(ctx))
        self._batch = llm._stack.enter_context(contextlib.closing(
            _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)))
        b = self._batch.batch
        self._tok = np.ctypeslib.as_array(b.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(b.pos, shape=(n_batch,))
        self._nseq = np.ctypeslib.as_array(b.n_seq_id, shape=(n_batch,))
        self._want = np.ctypeslib.as_array(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n_batch,))
        self._seq = [b.seq_id[i] for i in range(n_batch)]
        self._nseq[:] = 1
        self._mem = llama_cpp.llama_get_memory(ctx.ctx)
        self._vocab = llm._model.vocab
        self.n_vocab = llm.n_vocab()
        self._scratch = np.empty(self.n_vocab, dtype=np.float32)
        self._row_t = ctypes.c_float * self.n_vocab
        self._cells: list[list[int]] = [[] for _ in range(n_seq)]  # tokens in each slot's KV, position order
        self._piece: dict[int, str] = {}
        self._raw: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._rng = rng

    # -- the loop -------------------------------------------------------------------
    def run(self, jobs: list[DecodeJob]) -> None:
        """Decode every job without an error; results land on the jobs."""
        pending = deque(j for j in jobs if j.error is None)
        active: dict[int, DecodeJob] = {}
        while pending or active:
            while pending and len(active) < self.n_seq:
                self._admit(pending.popleft(), active)
            rows, members = self._fill(active)
            n = int(self._batch.batch.n_tokens)
            t0 = time.perf_counter()
            try:
                rc = self._lib.llama_decode(self._llm._ctx.ctx, self._batch.batch)
                if rc != 0:
                    raise DecodeError(f"llama_decode returned {rc} for a batch of {n} tokens")
            except Exception as e:  # noqa: BLE001 - a failed call must not take the worker down
                for job in active.values():
                    job.error = f"{type(e).__name__}: {e}"
                active.clear()
                self.reset()
                continue
            share = (time.perf_counter() - t0) * 1000 / max(len(members), 1)
            for job in members:
                job.compute_ms += share
            for i, job in rows:
                try:
                    if job.budget > 0:  # budget 0: only fill the cache (a warm prefix)
                        self._step(job, self._logits(i))
                except Exception as e:  # noqa: BLE001 - one job's failure is its own
                    job.error = f"{type(e).__name__}: {e}"
                    job._next = None
                if job.error is not None or job._next is None:
                    job.elapsed_ms = (time.perf_counter() - job._started) * 1000
                    del active[job._slot]

    def reset(self) -> None:
        self._lib.llama_memory_clear(self._mem, True)
        self._cells = [[] for _ in range(self.n_seq)]

    def _admit(self, job: DecodeJob, active: dict[int, DecodeJob]) -> None:
        """A free slot for the job, starting from the longest prefix cached in any slot."""
        prompt = job.prompt
        best, best_slot, own, slot = 0, -1, -1, -1
        for s, cells in enumerate(self._cells):
            k = _common_prefix(cells, prompt)
            if k > best:
                best, best_slot = k, s
            if s not in active and k > own:
                own, slot = k, s
        lib = self._lib
        room = max(len(prompt) - self._tail, 0)  # at least one token to evaluate: its logits start the answer
        if best > own:  # another slot holds a longer prefix: copy its cache over, keep the prefix
            keep = min(best, room)
            lib.llama_memory_seq_rm(self._mem, slot, -1, -1)
            lib.llama_memory_seq_cp(self._mem, best_slot, slot, -1, -1)
            lib.llama_memory_seq_rm(self._mem, slot, keep, -1)
            self._cells[slot] = prompt[:keep]
        else:
            keep = min(own, room)
            lib.llama_memory_seq_rm(self._mem, slot, keep, -1)
            del self._cells[slot][keep:]
        job._slot, job._fed, job._next = slot, keep, None
        job._started = time.perf_counter()
        active[slot] = job

    def _fill(self, active: dict[int, DecodeJob]) -> tuple[list[tuple[int, DecodeJob]], list[DecodeJob]]:
        """This step's batch: the next token of each decoding job, then prompt tokens (exact: one
        starting job's prompt tokens alone, else the decoding jobs' next tokens). Returns the
        rows whose logits are read, and the jobs in the batch."""
        rows: list[tuple[int, DecodeJob]] = []
        members: list[DecodeJob] = []
        n = 0
        if self.exact:
            job = next((j for j in active.values() if j._next is None and j._fed < len(j.prompt)), None)
            if job is not None:
                self._put_prompt(job, 0, rows)
                return rows, [job]
        for job in active.values():
            if job._next is not None:
                self._put(n, job._next, len(self._cells[job._slot]), job._slot, True)
                self._cells[job._slot].append(job._next)
                rows.append((n, job))
                members.append(job)
                n += 1
        for job in active.values():
            if job._next is None and job._fed < len(job.prompt) and n < self.n_batch:
                n = self._put_prompt(job, n, rows)
                members.append(job)
        self._batch.batch.n_tokens = n
        return rows, members

    def _put_prompt(self, job: DecodeJob, n: int, rows: list[tuple[int, DecodeJob]]) -> int:
        """The job's next prompt tokens from batch row n on; returns the rows filled."""
        left = len(job.prompt) - job._fed
        take = min(left, self.n_batch - n)
        if self.exact and left - take == 1 and take > 2:
            take -= 1  # no 1-token chunk after this one (module doc, point 3)
        part = job.prompt[job._fed: job._fed + take]
        cells = self._cells[job._slot]
        self._tok[n: n + take] = part
        self._pos[n: n + take] = np.arange(len(cells), len(cells) + take)
        self._want[n: n + take] = 0
        for i in range(n, n + take):
            self._seq[i][0] = job._slot
        cells.extend(part)
        job._fed += take
        n += take
        if job._fed == len(job.prompt):
            self._want[n - 1] = 1
            rows.append((n - 1, job))
        self._batch.batch.n_tokens = n
        return n

    def _put(self, i: int, tok: int, pos: int, seq: int, want: bool) -> None:
        self._tok[i] = tok
        self._pos[i] = pos
        self._seq[i][0] = seq
        self._want[i] = want

    def _logits(self, i: int) -> np.ndarray:
        """Batch token i's logits, read in place in llama.cpp's buffer (valid until the next decode)."""
        addr = ctypes.cast(self._lib.llama_get_logits_ith(self._llm._ctx.ctx, i), ctypes.c_void_p).value
        if not addr:
            raise DecodeError(f"llama.cpp has no logits for batch token {i}")
        return np.frombuffer(self._row_t.from_address(addr), dtype=np.float32)

    def _step(self, job: DecodeJob, logits: np.ndarray) -> None:
        """The job's logits row: pick its next token, record its log-prob, stop or go on."""
        scratch = self._scratch
        top_tok = int(logits.argmax())
        m = float(logits[top_tok])
        np.subtract(logits, m, out=scratch)
        np.exp(scratch, out=scratch)
        lse = m + math.log(float(scratch.sum()))
        tok = top_tok if job.temperature <= 0 else self._sample(logits, job.temperature)
        top: dict[str, float] = {}
        if job.top_k:
            k = min(job.top_k, self.n_vocab)
            idx = np.argpartition(logits, self.n_vocab - k)[self.n_vocab - k:]
            for i in idx[np.argsort(-logits[idx], kind="stable")]:
                top.setdefault(self.piece(int(i)), float(logits[i]) - lse)
        job.tokens.append(TokenLogprob(self.piece(tok), float(logits[tok]) - lse, top))
        job._next = None
        if self.is_eog(tok):
            job.finished = True
            return
        job._out.append(tok)
        job._bytes += self._raw_piece(tok)
        text = job._bytes.decode("utf-8", errors="ignore")
        cut = min((i for i in (text.find(s) for s in job.stops) if i >= 0), default=-1)
        if cut >= 0:
            job.text, job.finished = text[:cut], True
            return
        job.text = text
        if len(job._out) < job.budget:
            job._next = tok

    def _sample(self, logits, temperature: float) -> int:
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        return int(self._rng().choice(len(p), p=p))

    # -- vocabulary, cached ---------------------------------------------------------------
    def piece(self, tok: int) -> str:
        """A token as shown in log-prob lists (special tokens by name)."""
        s = self._piece.get(tok)
        if s is None:
            s = self._piece[tok] = self._token_bytes(tok, True).decode("utf-8", errors="replace")
        return s

    def _raw_piece(self, tok: int) -> bytes:
        b = self._raw.get(tok)
        if b is None:
            b = self._raw[tok] = self._token_bytes(tok, False)
        return b

    def _token_bytes(self, tok: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, tok, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, tok, buf, -n, 0, special)
        return buf.raw[:n]

    def is_eog(self, tok: int) -> bool:
        e = self._eog.get(tok)
        if e is None:
            e = self._eog[tok] = bool(self._lib.llama_vocab_is_eog(self._vocab, tok))
        return e

    def describe(self) -> dict[str, Any]:
        return {"n_seq": self.n_seq, "kv_cells": self.n_ctx * self.n_seq, "exact": self.exact}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
