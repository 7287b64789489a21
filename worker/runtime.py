"""What a worker process builds once and reuses for every job: the store, the
portfolios jobs were submitted with (by digest), their policies, and one backend
per tier (a local model is loaded once, not per job)."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from router.policies import build_policy
from router.policy import Policy
from router.portfolio import Portfolio, Tier, portfolio_from_spec

from .backends import Backend, build_backend
from .settings import Settings
from .store import Store


@dataclass(frozen=True)
class Loaded:
    portfolio: Portfolio
    policy: Policy


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = Store(settings.db_url)
        self._portfolios: dict[str, Loaded] = {}
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def add_portfolio(self, portfolio: Portfolio) -> Loaded:
        with self._lock:
            got = self._portfolios.get(portfolio.digest)
            if got is None:
                got = self._portfolios[portfolio.digest] = Loaded(portfolio, build_policy(portfolio))
            return got

    def loaded(self, digest: str) -> Loaded:
        got = self._portfolios.get(digest)
        if got is None:
            got = self.add_portfolio(portfolio_from_spec(self.store.portfolio_spec(digest)))
        return got

    @staticmethod
    def _backend_key(tier: Tier) -> str:
        return json.dumps({"name": tier.name, "backend": tier.backend.model_dump(mode="json")}, sort_keys=True)

    def backend(self, tier: Tier) -> Backend:
        """The tier's backend, built on first use; identical specs share one."""
        key = self._backend_key(tier)
        b = self._backends.get(key)
        if b is None:
            with self._lock:
                b = self._backends.get(key)
                if b is None:
                    b = self._backends[key] = build_backend(tier)
        return b

    def close(self) -> None:
        with self._lock:
            for b in self._backends.values():
                b.close()
            self._backends.clear()
