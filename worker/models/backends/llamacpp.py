"""llamacpp backend: a GGUF model inside the worker process (llama-cpp-python).

One model per backend, loaded once when the worker builds it; every job is a
greedy (or sampled, with temperature > 0) decode that returns the answer with
each generated token's log-probability, and its top-k alternatives when the
policy asks for them.

Options (portfolio `[tiers.backend]`):
  model            a pack name (tiny | small | medium) or a pack model name, found
                   in the model cache by `worker.models.modelpack` (prepared by
                   `cascade models prepare`)
  model_path       or: any GGUF file
  n_ctx            context size in tokens (default 1024)
  n_threads        CPU threads (default: CASCADE_MODEL_THREADS, else all cores)
  n_batch          prompt-processing batch (default 256)
  max_tokens       answer length limit (default 32)
  stop             stop sequences, e.g. ["\\n"] (default none)
  mode             completion (default): the prompt as is, or through
                   prompt_template; chat: the model's chat template
  prompt_template  completion mode: text with {prompt} where the job's prompt
                   goes (e.g. a few-shot "Q: ...\\nA:" block)
  system           chat mode: a system message
  temperature      0 (default) = greedy
  seed             sampling seed when temperature > 0 (default 0)
  top_logprobs     alternatives per token to return even when the policy does
                   not ask (default 0)
  warm_prefix      evaluate the prompt_template's text before {prompt} at load, so
                   the first job does not pay for it (default true)
  cpu_lock         run on the process's one shared llama.cpp thread, taking turns
                   with the other models of this process (default true); false:
                   on a thread of its own, in parallel with them.
  n_parallel       jobs of a stage decoded together as parallel sequences (default
                   8); the KV cache holds n_ctx tokens for each
  batch_invariant  answers and log-probs of a job the same, bit for bit, whatever else
                   is decoded with it (default true); costs ggml's tiled k-quant
                   matmul for the whole process (see `tiled_matmul_off`)

Where the computation runs: every llama.cpp call (load, prompt, decode) of a
backend runs on one long-lived "llama-cpu" thread, never on the calling thread.
llama.cpp parallelises with OpenMP, and with this build a second thread that
starts OpenMP work after another thread did runs it about 2x slower for good
(measured: the same model, 95 ms per answer on the first thread, 185-215 ms on
any later one). Worker pools call backends from their own threads, so the calls
are handed to the one thread that does all the OpenMP work. That thread is also
why the models of one process take turns: the embedded mode runs every tier in
one process, each model uses all cores, and two models decoding at once on the
same cores slow each other down far more than 2x. In the distributed mode (one
model per process) nothing waits.

The decode is our own loop over llama.cpp's logits (`llama_decoder.py`) rather
than `create_completion(logprobs=...)`: that path needs `logits_all=True` (an
n_ctx x vocab float array) and sorts the whole vocabulary in Python for every
token; here only each sequence's last logits row is read, in place, and the
shared prompt prefix (e.g. the few-shot block) stays in the KV cache between
jobs. `generate_many` decodes a stage's jobs together (n_parallel sequences of
one context, one `llama_decode` per step for all of them); `generate` is the
same loop with one job.
"""
from __future__ import annotations

import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from router.core.attempt import Query
from router.core.policy import Needs
from router.core.portfolio import Tier
from worker.config.settings import get_settings
from worker.job.request import system_of
from worker.models import modelpack
from worker.models.backends.base import (
    Backend,
    BackendConfigError,
    BackendFailure,
    BackendResult,
    option,
    refused_field,
    reject_unknown_options,
)
from worker.models.backends.llama_decoder import DecodeJob, ParallelDecoder

_OPTIONS = {"model", "model_path", "n_ctx", "n_threads", "n_batch", "max_tokens", "stop", "mode",
            "prompt_template", "system", "temperature", "seed", "top_logprobs", "warm_prefix", "cpu_lock",
            "n_parallel", "batch_invariant"}
_shared: "_ComputeThread | None" = None
_shared_lock = threading.Lock()


class _ComputeThread:
    """One thread that runs the llama.cpp work handed to it, in order."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None

    def run(self, fn, *args):
        if threading.get_ident() == self._ident:
            return fn(*args)
        return self._pool.submit(self._call, fn, args).result()

    def _call(self, fn, args):
        self._ident = threading.get_ident()
        return fn(*args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


def shared_compute_thread() -> _ComputeThread:
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = _ComputeThread("llama-cpu")
        return _shared


_patched = False


def _import_llama():
    try:
        import llama_cpp  # deferred: a heavy optional dependency (the `local` extra), loaded only by llamacpp tiers
    except ImportError as e:
        raise BackendConfigError(
            f"the llamacpp backend needs llama-cpp-python: pip install -e '.[local]' ({e})"
        ) from None
    disable_extra_buffers()
    return llama_cpp


def disable_extra_buffers() -> None:
    """Load models without llama.cpp's "extra buffer types" (weight repacking, AMX).

    A llama-cpp-python built with -march=native on a CPU that reports AMX (Sapphire
    Rapids and later) routes quantized matmuls through AMX tiles; in some virtual
    machines (seen on Firecracker guests) the first `ldtilecfg` then dies with a
    general protection fault, i.e. the worker segfaults on its first token. Plain
    CPU buffers avoid that at a small speed cost. Set CASCADE_LLAMA_EXTRA_BUFFERS=1
    to keep them (e.g. on bare metal). Process-wide, idempotent.
    """
    global _patched
    if _patched or os.environ.get("CASCADE_LLAMA_EXTRA_BUFFERS", "") in ("1", "true", "yes"):
        return
    import llama_cpp.llama_cpp as low  # deferred: llama_cpp is optional (see _import_llama)

    original = low.llama_model_default_params

    def default_params():
        params = original()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = default_params
    _patched = True


_tiled_off: bool | None = None  # ggml's tiled k-quant matmul in this process, fixed by the first model loaded


def tiled_matmul_off(wanted: bool) -> bool:
    """Whether ggml's tiled k-quant matmul is off in this process; turns it off (GGML_CPU_TILED_MM=0)
    when `wanted` and no model was loaded yet.

    This build of ggml-cpu multiplies k-quant weights (Q4_K, Q6_K: the Qwen models) by 8 or
    more activation columns with a tiled kernel and by fewer with one dot product per column;
    the sums run in a different order, so a job's logits depend on how many jobs share its
    decode step (the 1.5B model's greedy answers diverged, log-prob differences up to 2.7).
    Off, every column takes the dot product whatever the batch. ggml reads the variable once
    per process, at its first matmul: the first model loaded decides, and a value set in the
    environment beforehand wins. The tiled kernel is the faster one for 8 or more columns
    (`cascade bench llamacpp`, 8 jobs: 3.5-6.5% more tokens/s batched); a single job's step
    never used it.
    """
    global _tiled_off
    if _tiled_off is None:
        if wanted:
            os.environ.setdefault("GGML_CPU_TILED_MM", "0")
        value = os.environ.get("GGML_CPU_TILED_MM")
        number = re.match(r"\s*[+-]?\d+", value or "")  # ggml: on unless atoi(value) == 0
        _tiled_off = value is not None and (number is None or int(number.group()) == 0)
    return _tiled_off


class LlamaCppBackend(Backend):
    kind = "llamacpp"
    capabilities = frozenset({"logprobs", "top_logprobs"})
    pool = "solo"

    def __init__(self, tier: Tier):
        super().__init__(tier)
        reject_unknown_options(tier, _OPTIONS)
        name = option(tier, "model", str, None)
        path = option(tier, "model_path", str, None)
        if (name is None) == (path is None):
            raise BackendConfigError(f"tier {tier.name!r}: the llamacpp backend needs exactly one of "
                                     f"'model' (tiny | small | medium, see `cascade models list`) or 'model_path'")
        self.n_ctx = option(tier, "n_ctx", int, 1024)
        self.n_batch = option(tier, "n_batch", int, 256)
        self.n_parallel = option(tier, "n_parallel", int, 8)
        self.max_tokens = option(tier, "max_tokens", int, 32)
        self.temperature = float(option(tier, "temperature", (int, float), 0.0))
        self.seed = option(tier, "seed", int, 0)
        self.top_k_default = option(tier, "top_logprobs", int, 0)
        self.mode = option(tier, "mode", str, "completion")
        self.system = option(tier, "system", str, None)
        self.template = option(tier, "prompt_template", str, None)
        self.warm_prefix = option(tier, "warm_prefix", bool, True)
        self.cpu_lock = option(tier, "cpu_lock", bool, True)
        self.batch_invariant = option(tier, "batch_invariant", bool, True)
        stop = option(tier, "stop", (list, str), [])
        self.stop = tuple([stop] if isinstance(stop, str) else stop)
        settings = get_settings()
        threads = option(tier, "n_threads", int, None)
        self.n_threads = threads or settings.model_threads or os.cpu_count() or 1
        for key, v, low in (("n_ctx", self.n_ctx, 16), ("n_batch", self.n_batch, 1), ("max_tokens", self.max_tokens, 1),
                            ("n_threads", self.n_threads, 1), ("top_logprobs", self.top_k_default, 0),
                            ("n_parallel", self.n_parallel, 1)):
            if v < low:
                raise BackendConfigError(f"tier {tier.name!r}: backend option {key!r} must be >= {low}, got {v}")
        if self.n_parallel > min(self.n_batch, self.n_ctx, 256):
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'n_parallel' ({self.n_parallel}) must be "
                                     f"<= n_batch ({self.n_batch}), <= n_ctx ({self.n_ctx}) and <= 256")
        if self.mode not in ("completion", "chat"):
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'mode' must be 'completion' or 'chat', "
                                     f"got {self.mode!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'stop' must be non-empty strings")
        if self.template is not None and "{prompt}" not in self.template:
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'prompt_template' must contain {{prompt}}")
        if self.template is not None and self.mode == "chat":
            raise BackendConfigError(f"tier {tier.name!r}: 'prompt_template' is for mode = \"completion\"; "
                                     f"in chat mode use 'system'")
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise BackendConfigError(f"tier {tier.name!r}: backend option 'temperature' must be >= 0")

        if name is not None:
            try:
                self.path = modelpack.resolve(name, settings.model_cache)
                self.model_name = modelpack.spec(name).model
            except modelpack.ModelPackError as e:
                raise BackendConfigError(f"tier {tier.name!r}: {e}") from None
        else:
            self.path = Path(path).expanduser()
            self.model_name = self.path.stem
            if not self.path.is_file():
                raise BackendConfigError(f"tier {tier.name!r}: model file {self.path} does not exist; fix "
                                         f"'model_path', or use model = \"tiny\" | \"small\" | \"medium\" "
                                         f"after `cascade models prepare`")
        self._compute = shared_compute_thread() if self.cpu_lock else _ComputeThread(f"llama-{tier.name}")
        self._rng = None
        self._llm = None
        self._llm = self._compute.run(self._load)
        if self.template and self.warm_prefix:
            self._compute.run(self._warm, self.template.split("{prompt}", 1)[0])

    def _warm(self, prefix: str) -> None:
        tokens = self._llm.tokenize(prefix.encode("utf-8"), add_bos=True, special=False)
        if not 1 < len(tokens) < self.n_ctx:
            return  # too long: the job that uses it gets the clear error
        # budget 0: only into the KV cache; the last token may merge with the prompt's first
        self._decoder.run([DecodeJob(prompt=tokens[:-1], budget=0)])

    # -- loading -----------------------------------------------------------------
    def _load(self):
        llama_cpp = _import_llama()
        self.tiled_off = tiled_matmul_off(self.batch_invariant)
        try:
            llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_batch=min(self.n_batch, self.n_ctx),
                                  n_threads=self.n_threads, n_threads_batch=self.n_threads, logits_all=False,
                                  verbose=False)
        except (ValueError, RuntimeError, OSError) as e:
            raise BackendConfigError(
                f"tier {self.tier.name!r}: llama.cpp cannot load model file {self.path}: {e}; if it is a pack "
                f"model run `cascade models prepare`, else check that the file is a GGUF model"
            ) from None
        try:
            self._decoder = ParallelDecoder(llm, llama_cpp, n_seq=self.n_parallel, n_ctx=self.n_ctx,
                                            n_batch=min(self.n_batch, self.n_ctx), rng=self._rng_of,
                                            exact=self.batch_invariant)
        except (ValueError, RuntimeError) as e:
            llm.close()
            raise BackendConfigError(f"tier {self.tier.name!r}: llama.cpp cannot make a context of "
                                     f"{self.n_parallel} x {self.n_ctx} tokens for {self.path}: {e}; lower "
                                     f"n_parallel or n_ctx") from None
        self._chat = None
        if self.mode == "chat":
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # deferred: llama_cpp is optional

            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                llm.close()
                raise BackendConfigError(f"tier {self.tier.name!r}: model {self.path} has no chat template; "
                                         f"use mode = \"completion\"")
            piece = lambda t: llm.detokenize([t], special=True).decode("utf-8", errors="ignore")  # noqa: E731
            self._chat = Jinja2ChatFormatter(template=template, eos_token=piece(llm.token_eos()),
                                             bos_token=piece(llm.token_bos()) if llm.token_bos() >= 0 else "")
        return llm

    def clear_cache(self) -> None:
        """Forget the prompts kept in the KV cache: the next jobs start cold (benchmarks)."""
        if self._llm is not None:
            self._compute.run(self._decoder.reset)

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            self._compute.run(llm.close)
        if not self.cpu_lock and hasattr(self, "_compute"):
            self._compute.shutdown()

    # -- one job -------------------------------------------------------------------
    @classmethod
    def refuses(cls, tier: Tier, query: Query) -> str | None:
        if tier.backend.options.get("mode", "completion") == "chat":
            return None
        # completion mode sends one text: a system prompt or chat history has no place in it
        return refused_field(query, frozenset({"max_tokens", "temperature", "stop"}), chat=False)

    def _prompt_tokens(self, query: Query) -> list[int]:
        llm = self._llm
        if self._chat is not None:
            system = system_of(query.messages, query.params) or self.system
            turns = [m for m in query.messages if m["role"] != "system"] or [{"role": "user", "content": query.prompt}]
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": m["role"], "content": m["content"]} for m in turns]
            text = self._chat(messages=messages).prompt
            return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        text = self.template.replace("{prompt}", query.prompt) if self.template else query.prompt
        # the job's text is data: special-token markup in it is not interpreted
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def generate(self, query: Query, needs: Needs) -> BackendResult:
        r = self.generate_many([query], needs)[0]
        if isinstance(r, BackendFailure):
            raise r
        return r

    def generate_many(self, queries: Sequence[Query], needs: Needs) -> list[BackendResult | BackendFailure]:
        """The queries decoded together as parallel sequences (up to n_parallel at a time),
        each with its own parameters; a query that cannot run gets its BackendFailure."""
        top_k = max(needs.top_logprobs, self.top_k_default)
        out: list[BackendResult | BackendFailure | None] = []
        for q in queries:
            try:
                self.check_request(q)
                out.append(None)
            except BackendFailure as e:
                out.append(e)
        return self._compute.run(self._generate_many, list(queries), top_k, out)

    def _generate(self, query: Query, top_k: int) -> BackendResult:
        r = self._generate_many([query], top_k, [None])[0]
        if isinstance(r, BackendFailure):
            raise r
        return r

    def _generate_many(self, queries: list[Query], top_k: int,
                       out: list[BackendResult | BackendFailure | None]) -> list[BackendResult | BackendFailure]:
        # on the compute thread
        if self._llm is None:
            failure = BackendFailure(f"tier {self.tier.name!r}: the model {self.model_name} was closed")
            return [r if r is not None else failure for r in out]
        jobs: list[tuple[int, DecodeJob]] = []
        for i, q in enumerate(queries):
            if out[i] is None:
                try:
                    jobs.append((i, self._job(q, top_k)))
                except BackendFailure as e:
                    out[i] = e
        self._decoder.run([j for _, j in jobs])
        for i, job in jobs:
            out[i] = self._result(job)
        return out  # type: ignore[return-value]

    def _job(self, query: Query, top_k: int) -> DecodeJob:
        p = query.params
        try:
            prompt = self._prompt_tokens(query)
        except Exception as e:  # noqa: BLE001 - a template or tokenizer error is this job's
            raise BackendFailure(f"llama.cpp cannot tokenize this prompt for model {self.model_name}: "
                                 f"{type(e).__name__}: {e}") from None
        n_prompt = len(prompt)
        if n_prompt >= self.n_ctx:
            raise BackendFailure(
                f"prompt too long: {n_prompt} tokens, but model {self.model_name} runs with a context of "
                f"{self.n_ctx} tokens (backend option n_ctx of tier {self.tier.name!r}); shorten the prompt "
                f"or raise n_ctx"
            )
        if n_prompt == 0:
            raise BackendFailure(f"empty prompt: nothing to answer for model {self.model_name}")
        return DecodeJob(prompt=prompt, budget=min(p.get("max_tokens", self.max_tokens), self.n_ctx - n_prompt),
                         temperature=p.get("temperature", self.temperature),
                         stops=self.stop if p.get("stop") is None else tuple(p["stop"]), top_k=top_k)

    def _result(self, job: DecodeJob) -> BackendResult | BackendFailure:
        if job.error is not None:
            return BackendFailure(f"llama.cpp failed on this prompt with model {self.model_name}: {job.error}")
        return BackendResult(
            text=job.text.strip(),
            tokens=job.tokens,
            stop=job.stops,
            tokens_in=len(job.prompt),
            tokens_out=len(job.tokens),
            latency_ms=job.elapsed_ms,
            cost_usd=None,
            meta={"finish_reason": "stop" if job.finished else "length", "model": self.model_name,
                  "compute_ms": round(job.compute_ms, 3)},
        )

    def _rng_of(self):
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def _piece(self, tok: int) -> str:
        return self._decoder.piece(tok)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_name, "path": str(self.path), "n_ctx": self.n_ctx, "n_threads": self.n_threads,
                "n_parallel": self.n_parallel, "batch_invariant": self.batch_invariant and self.tiled_off}
