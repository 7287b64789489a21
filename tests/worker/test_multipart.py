"""The streaming multipart reader of POST /v1/files: whatever the network's framing
(one byte at a time, or cuts inside a delimiter), the parts and their bytes come out
the same; a body that is not multipart, or ends early, is refused naming why."""
from __future__ import annotations

import random

import httpx
import pytest

from worker.service.multipart import MultipartError, MultipartReader, Part, boundary_of


def encoded(files, data) -> tuple[str, bytes]:
    req = httpx.Request("POST", "http://x/", files=files, data=data)
    return req.headers["content-type"], req.read()


def parse(ctype: str, body: bytes, cuts: list[int]) -> dict[str, tuple[str | None, bytes]]:
    reader = MultipartReader(boundary_of(ctype))
    out: dict[str, tuple[str | None, bytes]] = {}
    name = None
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    for piece in pieces:
        for ev in reader.feed(piece):
            if isinstance(ev, Part):
                name = ev.name
                out[name] = (ev.filename, b"")
            elif ev is None:
                name = None
            else:
                assert name is not None
                out[name] = (out[name][0], out[name][1] + ev)
    reader.close()
    return out


# data that looks like the delimiter's start, line ends of every kind, binary bytes
PAYLOAD = b'{"a": 1}\r\n--\r\n--not-the-boundary\n\r\r\n' + bytes(range(256)) * 40 + b"\r\n-"


@pytest.mark.parametrize("seed", range(5))
def test_any_framing_gives_the_same_parts(seed):
    ctype, body = encoded({"file": ("in put.jsonl", PAYLOAD)}, {"purpose": "batch"})
    rnd = random.Random(seed)
    cuts = sorted(rnd.sample(range(1, len(body)), 40))
    assert parse(ctype, body, cuts) == {"purpose": (None, b"batch"), "file": ("in put.jsonl", PAYLOAD)}


def test_one_byte_at_a_time_and_the_file_before_the_purpose():
    ctype, body = encoded({"file": ("x.jsonl", PAYLOAD[:300])}, None)
    boundary = ctype.split("boundary=")[1].encode()
    # a hand-made body with the file part first (curl -F file=@x -F purpose=batch)
    body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + PAYLOAD[:300] + b"\r\n--" + boundary
            + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--' + boundary + b"--\r\n")
    assert parse(ctype, body, list(range(1, len(body)))) == {"file": ("x.jsonl", PAYLOAD[:300]),
                                                             "purpose": (None, b"batch")}


def test_not_multipart_or_cut_short_is_refused():
    with pytest.raises(MultipartError, match="must be multipart/form-data"):
        boundary_of("application/json")
    with pytest.raises(MultipartError, match="without a boundary"):
        boundary_of("multipart/form-data")
    ctype, body = encoded({"file": ("x.jsonl", b"abc")}, {"purpose": "batch"})
    with pytest.raises(MultipartError, match="ended before its closing delimiter"):
        parse(ctype, body[:-20], [])
