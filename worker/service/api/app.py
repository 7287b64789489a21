"""The FastAPI application: one `Client` per process (its store, Celery app and LISTEN
connection; in the embedded mode worker.client gives it the tier workers), the
routes, health checks, and every error as a 4xx in the OpenAI shape naming the field."""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.core.errors import PortfolioError, UserError
from router.core.portfolio import Portfolio
from worker.config.settings import Settings, get_settings
from worker.job.request import RequestError
from worker.queue.submit import IdempotencyConflict
from worker.service.api import batches, chat, files, jobs
from worker.service.api.common import ApiError, error_response, refusal
from worker.service.client import Client, JobNotFound
from worker.service.tenants import AuthError, BudgetExhausted, RateLimited, Tenants
from worker.service.webhooks import BatchUpkeep
from worker.store.errors import InterfaceError, OperationalError
from worker.store.tenants import TenantStore
from worker.store.webhooks import WebhookStore

_BODY_PARSE_ERROR = "There was an error parsing the body"
# threads reading chat completions' jobs on their notices: a read takes a millisecond or two
READ_THREADS = 16


def _parse_problem(cause: BaseException | None) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 at byte {cause.start}"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError):
        return str(cause).splitlines()[0][:200]
    return "it could not be parsed"


def _loc(loc) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "header", "path")]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def create_app(settings: Settings | None = None, portfolio: Portfolio | None = None, *,
               client_factory: Callable[[], Client] | None = None, client: Client | None = None) -> FastAPI:
    """client: the service's client, kept open by the caller; else one made by
    `client_factory` (default: a client whose tiers run elsewhere) and closed with the app."""
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        own = client is None
        app.state.client = client or (client_factory or (lambda: Client(settings, portfolio=portfolio)))()
        db_url = app.state.client.settings.db_url
        app.state.tenants = Tenants(TenantStore(db_url), settings)
        app.state.webhooks = WebhookStore(db_url)
        if app.state.client.waiter.listens:
            # the process's LISTEN connection made now, in a thread: a request's first wait
            # would otherwise open it on the event loop, blocking every other request
            await run_in_threadpool(app.state.client.waiter.listener)
        # the threads that read a chat completion's job as soon as its notice is heard (reads.JobReads)
        app.state.reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="cascade-read")
        upkeep = BatchUpkeep(app.state.webhooks, app.state.client.batches, secret=settings.webhook_secret,
                             backoff=settings.webhook_backoff, attempts=settings.webhook_attempts).start()
        try:
            yield
        finally:
            upkeep.stop()
            app.state.reads.shutdown(wait=False, cancel_futures=True)
            app.state.tenants.close()
            if own:
                app.state.client.close()

    app = FastAPI(title="Cascade Router task API", version="1", lifespan=lifespan,
                  description="Jobs, batches and an OpenAI-compatible chat endpoint; see docs/api.md.")
    app.include_router(jobs.router)
    app.include_router(batches.router)
    app.include_router(files.router)
    app.include_router(chat.router)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request):
        """The database and the broker answer."""
        c: Client = request.app.state.client
        try:
            c.jobs.ping()
            if not settings.embedded:
                with c.app.connection_for_write() as conn:
                    conn.ensure_connection(max_retries=1, timeout=2)
        except Exception as e:
            return error_response(503, f"not ready: {type(e).__name__}: {e}", type_="unavailable")
        return {"status": "ready", "mode": "embedded" if settings.embedded else "distributed"}

    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return error_response(e.status_code, e.detail, param=e.body["error"]["param"], code=e.body["error"]["code"],
                              headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: Request, e: StarletteHTTPException):
        # FastAPI answers a body it could not parse (not UTF-8, nested too deep for the
        # parser, an integer of thousands of digits) with 400 {"detail": ...}: here it is
        # a 422 in the OpenAI shape like any other body that is not JSON; every other
        # HTTP error (404 route, 405 method) takes the same shape
        if e.status_code == 400 and e.detail == _BODY_PARSE_ERROR:
            refused = await refusal(req)
            if refused is not None:
                return await _answer(req, refused)
            return error_response(422, f"body: not valid JSON ({_parse_problem(e.__cause__)})", param="body",
                                  code="json_invalid")
        return error_response(e.status_code, str(e.detail), headers=getattr(e, "headers", None),
                              code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(req: Request, e: RequestValidationError):
        refused = await refusal(req)
        if refused is not None:
            return await _answer(req, refused)
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(422, f"body: not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})",
                                  param="body", code="json_invalid")
        where = _loc(first.get("loc", ()))
        return error_response(422, f"{where}: {first.get('msg')}", param=where, code=first.get("type"))

    @app.exception_handler(RequestError)
    async def bad_request(_req, e: RequestError):
        return error_response(400, str(e), param=e.field)

    @app.exception_handler(PortfolioError)
    async def unknown_portfolio(_req, e: PortfolioError):
        return error_response(404, str(e), param="model", code="model_not_found")

    @app.exception_handler(IdempotencyConflict)
    async def conflict(_req, e: IdempotencyConflict):
        return error_response(409, str(e), param="Idempotency-Key", code="idempotency_conflict")

    @app.exception_handler(JobNotFound)
    async def missing(_req, e: JobNotFound):
        return error_response(404, str(e), param="id", code="not_found")

    @app.exception_handler(AuthError)
    async def unauthorized(_req, e: AuthError):
        return error_response(401, str(e), code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(BudgetExhausted)
    async def budget(_req, e: BudgetExhausted):
        return error_response(402, str(e), code="budget_exhausted", type_="insufficient_quota")

    @app.exception_handler(RateLimited)
    async def rate(_req, e: RateLimited):
        return error_response(429, str(e), code="rate_limited", type_="rate_limit_exceeded",
                              headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_away(_req, e: Exception):
        # The database is unreachable: a job is accepted only once its row is committed, so the
        # answer is 503 and the client sends the request again; a commit cut off mid-way may
        # have taken effect, which the same Idempotency-Key then finds instead of a second job
        return error_response(503, "the database is unreachable; send the request again (with the same "
                                   "Idempotency-Key, a request that was committed after all is not made twice)",
                              code="database_unavailable", type_="unavailable", headers={"Retry-After": "5"})

    @app.exception_handler(UserError)
    async def user_error(_req, e: UserError):
        return error_response(400, str(e))

    return app


async def _answer(request: Request, e: Exception):
    """The answer this app's handlers give to `e` (looked up by its class, as Starlette does)."""
    for cls in type(e).__mro__:
        handler = request.app.exception_handlers.get(cls)
        if handler is not None and cls is not Exception:
            return await handler(request, e)
    raise e
