"""A stand-in OpenAI-compatible model server for `cascade bench http`: it answers
every chat completion after a fixed latency, serving at most `capacity` requests at
once (the others wait their turn, as on a server whose batch is full), so its
capacity is capacity / latency requests per second. Answers are made from the
prompt (the same prompt, the same answer and token log-probs), so runs compare.

    python -m worker.bench.fakeserver --port 8000 --latency 0.2 --capacity 32

asyncio, HTTP/1.1 with keep-alive: one process serves hundreds of open
connections at little CPU, so the bench measures the worker, not this server.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json


def answer(prompt: str) -> dict:
    """The completion for this prompt: a short answer with per-token log-probs."""
    h = hashlib.sha256(prompt.encode()).digest()
    words = [f"w{b % 50}" for b in h[:3]]
    content = [{"token": w, "logprob": -(h[10 + i] % 100) / 200, "top_logprobs": []} for i, w in enumerate(words)]
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words)},
                     "logprobs": {"content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": len(words)},
    }


class FakeServer:
    def __init__(self, latency: float, capacity: int):
        self.latency = latency
        self.slots = asyncio.Semaphore(capacity)
        self.served = 0
        self.in_flight = 0
        self.peak = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                status, payload = await self.respond(method, path, body)
                writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def respond(self, method: str, path: str, body: bytes) -> tuple[str, bytes]:
        if method == "GET" and path.endswith("/stats"):
            return "200 OK", json.dumps({"served": self.served, "peak_in_flight": self.peak}).encode()
        if method == "GET" and path.endswith("/models"):
            return "200 OK", json.dumps({"data": [{"id": "fake"}]}).encode()
        if method != "POST" or not path.endswith("/chat/completions"):
            return "404 Not Found", b'{"error": {"message": "not found"}}'
        try:
            messages = json.loads(body)["messages"]
            prompt = str(messages[-1]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            return "400 Bad Request", b'{"error": {"message": "not a chat completion request"}}'
        async with self.slots:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            await asyncio.sleep(self.latency)
            self.in_flight -= 1
            self.served += 1
        return "200 OK", json.dumps(answer(prompt)).encode()


async def serve(host: str, port: int, latency: float, capacity: int) -> None:
    fake = FakeServer(latency, capacity)
    server = await asyncio.start_server(fake.handle, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--latency", type=float, default=0.2, help="seconds per request")
    p.add_argument("--capacity", type=int, default=32, help="requests served at once")
    a = p.parse_args()
    asyncio.run(serve(a.host, a.port, a.latency, a.capacity))


if __name__ == "__main__":
    main()
