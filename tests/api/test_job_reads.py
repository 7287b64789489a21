"""A chat completion's wait (worker.service.api.reads.JobReads) against a real
PostgreSQL LISTEN: a notice of the job starts its read on a reader thread at once,
a wait with no notice reads all the same when its time is up, every notice is
followed by a read (a wake-up is a hint), and nothing is read once it is closed."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from helpers.env import private_database

from worker.service.api.reads import JobReads
from worker.store.notify import JOB_CHANNEL, Listener, libpq_url

pytestmark = pytest.mark.services


def test_each_notice_starts_a_read_on_a_reader_thread_and_a_timeout_reads_anyway():
    with private_database() as url, ThreadPoolExecutor(2, thread_name_prefix="reader") as pool:
        listener = Listener(url)
        reads_done: list[str] = []

        def read() -> dict:
            reads_done.append(threading.current_thread().name)
            return {"read": len(reads_done)}

        def notify(key: str) -> None:
            with psycopg.connect(libpq_url(url), autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", (JOB_CHANNEL, key))

        async def scenario() -> None:
            reads = JobReads(listener, asyncio.get_running_loop(), pool)
            reads.subscribe("job-1", read)
            assert await reads.next(0.05) == {"read": 1}  # no notice: read once the time is up
            await asyncio.to_thread(notify, "job-2")  # another job's notice wakes nothing here
            await asyncio.to_thread(notify, "job-1")
            assert await reads.next(30) == {"read": 2}
            await asyncio.to_thread(notify, "job-1")  # a second notice: read again
            assert await reads.next(30) == {"read": 3}
            reads.close()
            await asyncio.to_thread(notify, "job-1")
            await asyncio.sleep(0.5)

        try:
            asyncio.run(scenario())
        finally:
            listener.close()
        assert len(reads_done) == 3 and all(name.startswith("reader") for name in reads_done)


def test_without_a_listener_each_wait_is_a_short_poll():
    with ThreadPoolExecutor(1) as pool:
        async def scenario() -> list[dict]:
            reads = JobReads(None, asyncio.get_running_loop(), pool)
            n = iter(range(1, 10))
            reads.subscribe("job-1", lambda: {"read": next(n)})
            return [await reads.next(5), await reads.next(5), await reads.now()]

        assert asyncio.run(scenario()) == [{"read": 1}, {"read": 2}, {"read": 3}]


def test_a_notice_that_carries_the_job_is_the_answer_without_a_read():
    with private_database() as url, ThreadPoolExecutor(2, thread_name_prefix="reader") as pool:
        listener = Listener(url)
        reads_done: list[str] = []

        def read() -> dict:
            reads_done.append("read")
            return {"read": len(reads_done)}

        def notify(payload: str) -> None:
            with psycopg.connect(libpq_url(url), autocommit=True) as conn:
                conn.execute("SELECT pg_notify(%s, %s)", (JOB_CHANNEL, payload))

        async def scenario() -> list[dict]:
            reads = JobReads(listener, asyncio.get_running_loop(), pool)
            # the job from a notice that carried it (a stand-in for Client.from_notice), else nothing
            reads.subscribe("job-1", read, lambda notice: None if notice is None else {"notice": notice["status"]})
            await asyncio.to_thread(notify, '{"id": "job-1", "status": "succeeded"}')
            first = await reads.next(30)
            await asyncio.to_thread(notify, "job-1")  # a bare notice: read
            second = await reads.next(30)
            await asyncio.to_thread(notify, '{"id": "job-2", "status": "failed"}')  # not this job's
            third = await reads.next(0.3)  # no notice of its own: read once the time is up
            reads.close()
            return [first, second, third]

        try:
            got = asyncio.run(scenario())
        finally:
            listener.close()
        assert got == [{"notice": "succeeded"}, {"read": 1}, {"read": 2}]
