"""The embedded mode: real Celery workers, one per tier, as threads of this
process, consuming real queues on the in-memory transport. The stage task code
is the same as in the distributed mode; only the broker and database differ.
`cascade run` starts them here (worker.queue.batch); the client and `cascade
serve` get them through worker.client, the one place the service is wired to them."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from celery.worker import WorkController
from celery.worker import state as worker_state

from router.core.portfolio import Portfolio
from worker.config.settings import Settings
from worker.models.preflight import ensure_signals
from worker.queue.dispatch import worker_queues
from worker.queue.runtime import Runtime
from worker.queue.tasks import make_app

log = logging.getLogger("cascade.embedded")


class _Controller(WorkController):
    def __init__(self, *a, **kw):
        self.ready = threading.Event()
        super().__init__(*a, **kw)

    def on_consumer_ready(self, consumer):
        self.ready.set()


class EmbeddedWorkers:
    """Context manager: start a worker thread per tier; stop them all on exit."""

    def __init__(self, runtime: Runtime, portfolio: Portfolio, *, concurrency: int = 1, start_timeout: float = 120):
        self.runtime = runtime
        self.portfolio = portfolio
        self.concurrency = concurrency
        self.start_timeout = start_timeout
        self.controllers: list[_Controller] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def __enter__(self) -> "EmbeddedWorkers":
        rt = self.runtime
        rt.add_portfolio(self.portfolio)
        for i, tier in enumerate(self.portfolio.tiers):
            # load models now, not inside the first job; refuse what the policy needs but cannot get
            backend = rt.backend(tier)
            needs = rt.start_needs(self.portfolio, i)  # the file's policy's, and a promoted version's
            backend.check_needs(needs)
            # the tier worker's probe too, before any worker starts: a server whose answer lacks a signal the
            # policy reads is refused here as by `cascade worker`; one not reachable is not waited for (its
            # jobs fall back)
            ensure_signals(backend, needs, allow_missing=rt.settings.allow_missing_signals, wait=0)
        for tier in self.portfolio.tiers:
            for n in range(self.concurrency):
                # One app per worker thread: a worker's queue selection is stored on
                # its app, and the solo pool runs tasks with the thread's current app.
                tier_app = make_app(rt.settings, rt)
                ctl = _Controller(
                    app=tier_app, hostname=f"{tier.name}-{n}@embedded", pool="solo", concurrency=1,
                    queues=worker_queues(tier.queue_name), loglevel=logging.WARNING, ready_callback=None,
                    without_heartbeat=True, without_mingle=True, without_gossip=True,
                )
                t = threading.Thread(target=self._run, args=(ctl,), name=f"cascade-{tier.name}-{n}", daemon=True)
                self.controllers.append(ctl)
                self.threads.append(t)
                t.start()
        for ctl, t in zip(self.controllers, self.threads):
            if not ctl.ready.wait(self.start_timeout) or not t.is_alive():
                self.__exit__(None, None, None)
                raise RuntimeError(f"embedded worker {ctl.hostname} did not start: {self.errors or 'timeout'}")
        return self

    def _run(self, ctl: _Controller) -> None:
        ctl.app.set_current()
        try:
            ctl.start()
        except BaseException as e:  # surfaced by alive()
            self.errors.append(e)
            log.exception("embedded worker %s stopped", ctl.hostname)

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def __exit__(self, *exc) -> None:
        # should_terminate is process-wide: it stops every embedded worker at once
        worker_state.should_terminate = 0
        for t in self.threads:
            t.join(30)
        worker_state.should_terminate = None
        self.controllers.clear()
        self.threads.clear()


def tier_workers(settings: Settings) -> Callable[[Runtime, Portfolio], EmbeddedWorkers]:
    """What a client is given to run a portfolio's tiers in this process."""
    return lambda runtime, portfolio: EmbeddedWorkers(runtime, portfolio, concurrency=settings.worker_concurrency)
