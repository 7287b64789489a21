"""Backend registry. Modules are imported on first use, so a worker that serves a
replay tier never imports llama.cpp or an HTTP client it does not need."""
from __future__ import annotations

import difflib
import importlib

from router.core.portfolio import Portfolio, Tier
from worker.models.backends.base import (
    Backend,
    BackendConfigError,
    BackendFailure,
    BackendResult,
    TransientBackendError,
)

_KINDS = {
    "replay": "worker.models.backends.replay:ReplayBackend",
    "llamacpp": "worker.models.backends.llamacpp:LlamaCppBackend",
    "openai": "worker.models.backends.openai:OpenAIBackend",
    "speculative": "worker.models.backends.speculative:SpeculativeBackend",
}

__all__ = ["Backend", "BackendConfigError", "BackendFailure", "BackendResult", "TransientBackendError",
           "backend_class", "build_backend", "validate_portfolio"]


_LOADED: dict[str, type[Backend]] = {}


def backend_class(kind: str) -> type[Backend]:
    loaded = _LOADED.get(kind)  # the submitter asks once per tier per job: no import machinery each time
    if loaded is not None:
        return loaded
    target = _KINDS.get(kind)
    if target is None:
        near = difflib.get_close_matches(kind, list(_KINDS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise BackendConfigError(f"unknown backend kind {kind!r}{hint}; known: {', '.join(_KINDS)}")
    mod, _, cls = target.partition(":")
    _LOADED[kind] = getattr(importlib.import_module(mod), cls)
    return _LOADED[kind]


def build_backend(tier: Tier) -> Backend:
    return backend_class(tier.backend.kind)(tier)


def validate_portfolio(portfolio: Portfolio, *, build: bool = False) -> None:
    """Check every tier's backend kind and cheap options (with build: by building it,
    which loads a local model; the submitter never does that)."""
    
    policy = portfolio.built_policy
    for i, tier in enumerate(portfolio.tiers):
        cls = backend_class(tier.backend.kind)
        cls.check_options(tier)
        if build:
            b = cls(tier)
            b.check_needs(policy.needs(i))
            b.close()
