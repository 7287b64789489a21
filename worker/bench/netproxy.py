"""A TCP fault proxy for the network fault drill (`cascade bench faults --network`):
`tc netem` is not available on these machines, so the links between the hosts of
the drill run through this instead. It forwards one listening address to one
upstream and, as the drill asks, adds latency to every chunk in each direction,
loses packets (TCP never loses a byte: a lost segment shows to the application as
its retransmission timeout, so with probability `loss` a chunk is held 200 ms, and
again doubled with the same probability, as Linux's RTO backs off), resets every
open connection, or stalls everything.

asyncio in a thread of the drill's process: `set(...)` changes the faults at once
for open and new connections."""
from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass


@dataclass
class Faults:
    latency: float = 0.0  # seconds added to each chunk, each direction
    loss: float = 0.0  # probability per chunk that a segment of it is lost (held for a retransmission)
    stall: bool = False  # hold every byte (a partition that leaves connections open)


class FaultProxy:
    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], seed: int = 0):
        self.listen, self.upstream = listen, upstream
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.stats = {"connections": 0, "reset": 0, "lost": 0, "bytes": 0}
        self._conns: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name=f"netproxy-{listen[1]}", daemon=True)

    def start(self) -> "FaultProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"fault proxy on {self.listen} did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, self.listen[0], self.listen[1], backlog=512, reuse_address=True))
        self._ready.set()
        self._loop.run_forever()

    def set(self, **faults) -> None:
        """Change the faults (latency=, loss=, stall=); Faults() again for none."""
        self.faults = Faults(**{**self.faults.__dict__, **faults})

    def clear(self) -> None:
        self.faults = Faults()

    def reset_all(self) -> int:
        """Reset every open connection (an RST each way), as a peer's reboot does."""
        def go() -> int:
            n = 0
            for w in list(self._conns):
                n += 1
                _abort(w)
            self.stats["reset"] += n
            return n
        return asyncio.run_coroutine_threadsafe(_call(go), self._loop).result(10)

    def close(self) -> None:
        def stop() -> None:
            for w in list(self._conns):
                _abort(w)
            if self._server is not None:
                self._server.close()
            self._loop.call_later(0.2, self._loop.stop)  # the aborts (RSTs) go out first
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(stop)
            self._thread.join(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        try:
            up_r, up_w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 10)
        except (OSError, asyncio.TimeoutError):
            _abort(writer)
            return
        self._conns.update((writer, up_w))
        pair = (writer, up_w)
        await asyncio.gather(self._pipe(reader, up_w, pair), self._pipe(up_r, writer, pair),
                             return_exceptions=True)
        self._conns.difference_update(pair)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, pair) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                f = self.faults
                while f.stall:  # a partition that keeps the connection open: nothing passes
                    await asyncio.sleep(0.05)
                    f = self.faults
                if f.latency:
                    await asyncio.sleep(f.latency)
                rto = 0.2
                while f.loss and self.rng.random() < f.loss:  # lost, retransmitted after the RTO
                    self.stats["lost"] += 1
                    await asyncio.sleep(rto)
                    rto = min(rto * 2, 10.0)
                self.stats["bytes"] += len(data)
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in pair:
                if not w.is_closing():
                    w.close()


async def _call(fn):
    return fn()


def _abort(w: asyncio.StreamWriter) -> None:
    t = w.transport
    if t is not None and not t.is_closing():
        t.abort()  # an RST, not a FIN
