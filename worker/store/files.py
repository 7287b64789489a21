"""Files uploaded through /v1/files (OpenAI's Files API, purpose `batch`): a row per file
and its bytes in chunks of at most CHUNK bytes (PostgreSQL bytea, SQLite BLOB), so that
every API process reads what any of them stored, and no writer or reader holds a whole
file. A file is written `uploading` and becomes `processed` (readable) with its last
chunk; one that never finishes is removed by the writer, or by `cascade purge` once it
expires. Every read is scoped to a tenant."""
from __future__ import annotations

from datetime import datetime
from typing import Iterator

from sqlalchemy import select, update

from worker.store.engine import Database, newest_first
from worker.store.schema import file_chunks, files, now

CHUNK = 1 << 20
PROCESSED = "processed"


class FileStore(Database):
    def create(self, file_id: str, tenant: str, purpose: str, filename: str, expires_at: datetime | None) -> None:
        with self.tx() as c:
            c.execute(files.insert().values(id=file_id, tenant=tenant, purpose=purpose, filename=filename, bytes=0,
                                            status="uploading", created_at=now(), expires_at=expires_at))

    def append(self, file_id: str, seq: int, data: bytes) -> None:
        """One chunk (seq 0, 1, ...), committed on its own: an upload holds no long transaction."""
        with self.tx() as c:
            c.execute(file_chunks.insert().values(file_id=file_id, seq=seq, data=data))
            c.execute(update(files).where(files.c.id == file_id).values(bytes=files.c.bytes + len(data)))

    def finish(self, file_id: str) -> dict:
        with self.tx() as c:
            c.execute(update(files).where(files.c.id == file_id).values(status=PROCESSED))
            return dict(c.execute(select(files).where(files.c.id == file_id)).mappings().one())

    def file(self, file_id: str, tenant: str) -> dict | None:
        """The tenant's readable file (None: no such file, another tenant's, or not finished)."""
        with self.read() as c:
            r = c.execute(select(files).where(files.c.id == file_id, files.c.tenant == tenant,
                                              files.c.status == PROCESSED)).mappings().one_or_none()
            return dict(r) if r else None

    def page(self, tenant: str, *, after: str | None, limit: int, purpose: str | None = None) -> list[dict]:
        """The tenant's files newest first, those after the file `after` (a cursor);
        limit + 1 rows are asked for by the caller to learn whether more follow."""
        q = select(files).where(files.c.tenant == tenant, files.c.status == PROCESSED)
        if purpose:
            q = q.where(files.c.purpose == purpose)
        with self.read() as c:
            return newest_first(c, files, q, tenant, after, limit)

    def chunks(self, file_id: str) -> Iterator[bytes]:
        """The file's bytes a chunk at a time, one short read each."""
        seq = 0
        while True:
            with self.read() as c:
                data = c.execute(select(file_chunks.c.data).where(file_chunks.c.file_id == file_id,
                                                                  file_chunks.c.seq == seq)).scalar_one_or_none()
            if data is None:
                return
            yield bytes(data)
            seq += 1

    def delete(self, file_id: str, tenant: str | None = None) -> bool:
        """Delete the file and its chunks (of `tenant`, if given); True if it existed."""
        cond = [files.c.id == file_id] + ([files.c.tenant == tenant] if tenant is not None else [])
        with self.tx() as c:
            if c.execute(select(files.c.id).where(*cond)).one_or_none() is None:
                return False
            c.execute(file_chunks.delete().where(file_chunks.c.file_id == file_id))
            c.execute(files.delete().where(files.c.id == file_id))
        return True

    def expired(self, before: datetime) -> list[str]:
        """Files whose expiry is before `before` (an upload that never finished included)."""
        with self.read() as c:
            return list(c.execute(select(files.c.id).where(files.c.expires_at < before)).scalars())
