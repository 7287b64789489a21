"""Waiting for a job or a batch to finish, woken by the database rather than by polling it.

On PostgreSQL one listener thread per process holds a LISTEN connection
(channels `cascade_job_final` and `cascade_batch_done`, fired by the triggers of
migration 0003) and wakes every waiter registered for the id it hears. A waiter
registers first and then reads the row, so a completion that lands in between is
never missed. If the listening connection drops, every waiter is woken to read
again while the thread reconnects. A job's notice may carry the job itself (migration
0013: a JSON object with its `id`, when it fits the payload limit); each waiter is
handed it (`wake(notice)`, None for a bare id or a reconnect) and may use it instead
of reading the row.

SQLite (the embedded mode) has no notifications: waiters read the row every
`SQLITE_POLL` seconds.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Callable

import psycopg
import structlog
from sqlalchemy.engine import make_url

log = structlog.get_logger("cascade.notify")

JOB_CHANNEL = "cascade_job_final"
BATCH_CHANNEL = "cascade_batch_done"
SQLITE_POLL = 0.05
Wake = Callable[[dict | None], None]
_RECONNECT_S = 1.0


def libpq_url(sqlalchemy_url: str) -> str:
    return make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    """One LISTEN connection shared by every waiter of this process."""

    def __init__(self, db_url: str):
        self.dsn = libpq_url(db_url)
        self._waiters: dict[tuple[str, str], list[Wake]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cascade-listen", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise ConnectionError(f"cannot LISTEN on {make_url(db_url).render_as_string()}")

    def subscribe(self, channel: str, key: str, wake: Wake) -> Callable[[], None]:
        """Call `wake(notice)` (from the listener thread) when `key` is notified on
        `channel` (`notice`: the object the notice carried, or None); returns the
        function that unsubscribes."""
        with self._lock:
            self._waiters.setdefault((channel, key), []).append(wake)

        def unsubscribe() -> None:
            with self._lock:
                ws = self._waiters.get((channel, key))
                if ws and wake in ws:
                    ws.remove(wake)
                    if not ws:
                        del self._waiters[(channel, key)]
        return unsubscribe

    def _wake(self, channel: str | None, key: str | None, notice: dict | None = None) -> None:
        with self._lock:
            if channel is None:  # reconnecting: everyone reads again
                targets = [w for ws in self._waiters.values() for w in ws]
            else:
                targets = list(self._waiters.get((channel, key), ()))
        for w in targets:
            w(notice)

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True) as conn:
                    conn.execute(f"LISTEN {JOB_CHANNEL}")
                    conn.execute(f"LISTEN {BATCH_CHANNEL}")
                    self._ready.set()
                    self._wake(None, None)
                    while not self._closed.is_set():
                        for n in conn.notifies(timeout=0.5):
                            self._wake(n.channel, *parse_notice(n.payload))
            except psycopg.Error as e:
                if self._closed.is_set():
                    return
                log.warning("notify.reconnect", error=str(e))
                self._wake(None, None)
                time.sleep(_RECONNECT_S)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)


def parse_notice(payload: str) -> tuple[str, dict | None]:
    """(the key a notice is about, the object it carried or None): a bare id, or a JSON
    object with its `id` (migration 0013). Anything else is taken as a bare key."""
    if payload.startswith("{"):
        try:
            notice = json.loads(payload)
        except ValueError:
            return payload, None
        if isinstance(notice, dict) and isinstance(notice.get("id"), str):
            return notice["id"], notice
    return payload, None


class Waiter:
    """Block (or await) until `done()` is true, woken by notifications on PostgreSQL,
    by short polls on SQLite."""

    def __init__(self, db_url: str):
        self.db_url = db_url
        self.listens = make_url(db_url).get_backend_name() == "postgresql"
        self._listener: Listener | None = None
        self._lock = threading.Lock()

    def listener(self) -> Listener:
        with self._lock:
            if self._listener is None:
                self._listener = Listener(self.db_url)
            return self._listener

    def wait(self, channel: str, key: str, done: Callable[[], bool], timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self.listens:
            while not done():
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                time.sleep(SQLITE_POLL)
            return True
        event = threading.Event()
        unsubscribe = self.listener().subscribe(channel, key, lambda _notice: event.set())
        try:
            while not done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                event.wait(left)
                event.clear()
            return True
        finally:
            unsubscribe()

    async def wait_async(self, channel: str, key: str, done: Callable[[], bool], timeout: float | None) -> bool:
        """`done` runs in a thread (it reads the database); the loop is never blocked."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        check = lambda: loop.run_in_executor(None, done)  # noqa: E731
        if not self.listens:
            while not await check():
                if deadline is not None and loop.time() >= deadline:
                    return False
                await asyncio.sleep(SQLITE_POLL)
            return True
        event = asyncio.Event()
        listener = await loop.run_in_executor(None, self.listener)
        unsubscribe = listener.subscribe(channel, key, lambda _notice: loop.call_soon_threadsafe(event.set))
        try:
            while not await check():
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return False
                try:
                    await asyncio.wait_for(event.wait(), left)
                except TimeoutError:
                    pass
                event.clear()
            return True
        finally:
            unsubscribe()

    def expect(self, channel: str, loop: asyncio.AbstractEventLoop | None = None) -> "Expectation":
        """Listen on `channel` for a key named later, before the row it is about is
        written (`Expectation`); with `loop`, awaited there."""
        return Expectation(self.listener() if self.listens else None, channel, loop)

    def close(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None


class Expectation:
    """A wake-up for one key, subscribed before the key's row is written (`subscribe`,
    called by the writer with the new id): its notice cannot come before someone
    listens, so the waiter need not read the row before its first wake-up (one read
    fewer per interactive job). A bare wake-up is a hint, never the result: the caller
    reads the row after it (a listener that reconnects wakes everyone), unless the
    notice carried the job (`notice`). Without a listener (SQLite), each wait is a
    short poll."""

    def __init__(self, listener: Listener | None, channel: str, loop: asyncio.AbstractEventLoop | None = None):
        self.listener, self.channel, self.loop = listener, channel, loop
        self._event: threading.Event | asyncio.Event = asyncio.Event() if loop is not None else threading.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self.notice: dict | None = None  # what the last wake-up's notice carried, if anything

    def _wake(self, notice: dict | None) -> None:
        self.notice = notice
        if isinstance(self._event, asyncio.Event):
            self.loop.call_soon_threadsafe(self._event.set)
        else:
            self._event.set()

    def subscribe(self, key: str) -> None:
        if self.listener is not None and self._unsubscribe is None:
            self._unsubscribe = self.listener.subscribe(self.channel, key, self._wake)

    def wait(self, timeout: float | None) -> bool:
        """Until woken (True) or `timeout` seconds (False)."""
        if self.listener is None:
            time.sleep(SQLITE_POLL if timeout is None else min(SQLITE_POLL, max(timeout, 0.0)))
            return timeout is None or timeout > SQLITE_POLL
        woke = self._event.wait(timeout)
        self._event.clear()
        return woke

    async def wait_async(self, timeout: float | None) -> bool:
        if self.listener is None:
            await asyncio.sleep(SQLITE_POLL if timeout is None else min(SQLITE_POLL, max(timeout, 0.0)))
            return timeout is None or timeout > SQLITE_POLL
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
            woke = True
        except TimeoutError:
            woke = False
        self._event.clear()
        return woke

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
