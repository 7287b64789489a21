"""A streaming multipart/form-data reader for uploads (POST /v1/files): it is fed the
body as it arrives and hands back the parts' fields and data pieces as they are cut,
holding no more than one network read plus a delimiter's length, so a file of any size
goes on to its store piece by piece (the form parsers of the web frameworks spool the
whole part first, to memory or to a temporary file of the one process)."""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HEADERS = 16 << 10
_PARAM = re.compile(r';\s*([a-zA-Z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


class MultipartError(ValueError):
    pass


@dataclass
class Part:
    name: str
    filename: str | None


def boundary_of(content_type: str | None) -> bytes:
    ctype = content_type or ""
    if not ctype.lower().startswith("multipart/form-data"):
        raise MultipartError(f"the body must be multipart/form-data (got {ctype or 'no content type'!r})")
    params = {k.lower(): q or v for k, q, v in _PARAM.findall(ctype)}
    b = params.get("boundary")
    if not b or len(b) > 200:
        raise MultipartError("multipart/form-data without a boundary")
    return b.encode("latin-1")


def _disposition(headers: bytes) -> Part:
    for line in headers.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            params = {k.lower(): (q.replace('\\"', '"') if q else v) for k, q, v in _PARAM.findall(";" + value.split(";", 1)[-1])}
            if "name" in params:
                return Part(params["name"], params.get("filename"))
    raise MultipartError("a part has no Content-Disposition name")


class MultipartReader:
    """feed(bytes) -> events: Part (a part begins), bytes (its data), None (it ended);
    close() checks that the body ended with the closing delimiter."""

    def __init__(self, boundary: bytes):
        self.first = b"--" + boundary
        self.delim = b"\r\n--" + boundary
        self.buf = b""
        self.state = "preamble"  # preamble -> after_delim -> headers -> data -> after_delim ... -> done

    def feed(self, data: bytes) -> list:
        self.buf += data
        out: list = []
        while True:
            if self.state == "preamble":
                i = self.buf.find(self.first)
                if i < 0:
                    self.buf = self.buf[-len(self.first):]
                    return out
                self.buf, self.state = self.buf[i + len(self.first):], "after_delim"
            elif self.state == "after_delim":
                if len(self.buf) < 2:
                    return out
                if self.buf.startswith(b"--"):
                    self.state, self.buf = "done", b""
                    return out
                if not self.buf.startswith(b"\r\n"):
                    raise MultipartError("a multipart delimiter is not followed by a line end")
                self.buf, self.state = self.buf[2:], "headers"
            elif self.state == "headers":
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    if len(self.buf) > MAX_HEADERS:
                        raise MultipartError("a part's headers are longer than 16 KiB")
                    return out
                out.append(_disposition(self.buf[:i]))
                self.buf, self.state = self.buf[i + 4:], "data"
            elif self.state == "data":
                i = self.buf.find(self.delim)
                if i < 0:
                    keep = len(self.delim) - 1  # a delimiter may begin in these bytes
                    if len(self.buf) > keep:
                        out.append(self.buf[:-keep])
                        self.buf = self.buf[-keep:]
                    return out
                if i:
                    out.append(self.buf[:i])
                out.append(None)
                self.buf, self.state = self.buf[i + len(self.delim):], "after_delim"
            else:  # done: an epilogue is ignored
                self.buf = b""
                return out

    def close(self) -> None:
        if self.state != "done":
            raise MultipartError("the multipart body ended before its closing delimiter")
