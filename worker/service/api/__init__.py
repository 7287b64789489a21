"""`cascade serve`: the HTTP face of the task API (FastAPI). `create_app` builds it;
the routes live in `jobs`, `chat`, `batches` and `files`, the shared pieces in `common`."""
from worker.service.api.app import create_app

__all__ = ["create_app"]
