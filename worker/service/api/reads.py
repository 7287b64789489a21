"""A chat completion's wait for its job, read as soon as its notice is heard.

Like worker.store.notify.Expectation it is subscribed before the job's row is written
(`subscribe`, called by the submitter with the new id), so no read is needed before
the first notice, and a notice is a hint, never the result: every wake-up is followed
by a read, and a job not final yet is waited for again (a listener that reconnects
wakes everyone), unless the notice carried the finished job (migration 0013), which
is then the answer. The difference is where the read starts: on the listener's thread,
the moment the notice arrives, in this process's pool of reader threads; the event
loop gets the job already read. Waking the loop first and having it send the read to
a thread cost one more hand-over between threads per chat completion, the slowest
step of the wait on a busy machine.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import Executor, Future
from typing import Any, Callable

from worker.store.notify import JOB_CHANNEL, SQLITE_POLL, Listener

Read = Callable[[], dict[str, Any]]
FromNotice = Callable[[dict | None], dict[str, Any] | None]


class JobReads:
    def __init__(self, listener: Listener | None, loop: asyncio.AbstractEventLoop, executor: Executor):
        """listener: the process's (None on SQLite: each wait is a short poll)."""
        self.listener, self.loop, self.executor = listener, loop, executor
        self._reads: asyncio.Queue[Future] = asyncio.Queue()
        self._read: Read | None = None
        self._from_notice: FromNotice | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def subscribe(self, job_id: str, read: Read, from_notice: FromNotice | None = None) -> None:
        """From the submitter's thread, before the row is written: `read` reads the job;
        `from_notice` gives it from a notice that carried it (None: read it)."""
        self._read, self._from_notice = read, from_notice
        if self.listener is not None and self._unsubscribe is None:
            self._unsubscribe = self.listener.subscribe(JOB_CHANNEL, job_id, self._wake)

    def _wake(self, notice: dict | None) -> None:  # the listener's thread
        job = None if self._from_notice is None else self._from_notice(notice)
        if job is not None:  # the notice carried the finished job: no read, no hand-over to a reader thread
            fut: Future = Future()
            fut.set_result(job)
        else:
            fut = self.executor.submit(self._read)
        self.loop.call_soon_threadsafe(self._reads.put_nowait, fut)

    async def next(self, timeout: float) -> dict[str, Any]:
        """The job as read after its next notice, or after `timeout` seconds without one."""
        if self.listener is not None:
            try:
                return await asyncio.wrap_future(await asyncio.wait_for(self._reads.get(), timeout))
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(min(SQLITE_POLL, max(timeout, 0.0)))
        return await self.now()

    async def now(self) -> dict[str, Any]:
        """The job as read now (after `subscribe`)."""
        return await asyncio.wrap_future(self.executor.submit(self._read))

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
