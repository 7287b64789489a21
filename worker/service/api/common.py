"""What every route shares: the service's client, the caller's tenant, and errors in
the OpenAI shape ({"error": {"message", "type", "param", "code"}}) naming the field."""
from __future__ import annotations

from typing import Any

from fastapi import Header, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from worker.job.storable import clean_text
from worker.queue.submit import TENANT_DEFAULT
from worker.service.client import Client
from worker.service.tenants import AuthError, Tenants


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(status, message, headers=headers)
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    # a message or field name may quote the caller's text: a lone surrogate in it could not
    # be encoded, and the refusal would become a 500
    return JSONResponse({"error": {"message": clean_text(message), "type": type_, "param": clean_text(param),
                                   "code": code}}, status_code=status, headers=headers)


def service(request: Request) -> Client:
    return request.app.state.client


def caller(request: Request, authorization: str | None = Header(None, include_in_schema=False)) -> Client:
    """The service's client acting for the caller's tenant: the one its API key names
    (Authorization: Bearer <key>) when keys are required, else the default tenant."""
    tenants: Tenants = request.app.state.tenants
    if not tenants.settings.auth_required:
        return service(request).for_tenant(TENANT_DEFAULT)
    return service(request).for_tenant(tenants.authenticate(_bearer(authorization)))


def _bearer(authorization: str | None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise AuthError("an API key is required: Authorization: Bearer <key> (cascade keys create)")
    return key.strip()


async def submitter(request: Request, authorization: str | None = Header(None, include_in_schema=False)) -> Client:
    """`caller`, for a request that submits work: refused (402, 429) before anything is
    written when the tenant's budget is spent or its rate limit reached. The key and the
    tenant's limits are read in one statement, on one trip to the thread pool; a tenant
    found without a budget has its job inserted without the budget's lock (`budgeted`)."""
    return await run_in_threadpool(_admitted, request, authorization)


def admitted(request: Request) -> Client:
    """`submitter`'s work, blocking: for a handler that admits the caller on the same trip
    to the thread pool as its submission (`admits_in_handler`)."""
    return _admitted(request, request.headers.get("authorization"))


def admits_in_handler(endpoint):
    """Marks a route that admits its caller in its handler (`admitted`) rather than in a
    dependency: one trip to the thread pool fewer per request. Its body is validated
    before the handler runs, so a body that fails validation is answered by `refusal`:
    the caller hears 401, 402 or 429 first, as from any route that admits in a dependency."""
    endpoint.admits_in_handler = True
    return endpoint


async def refusal(request: Request) -> Exception | None:
    """For a request whose body could not be parsed or whose parameters failed validation
    (both found before the handler runs): why its route's admission refuses
    it (AuthError, BudgetExhausted, RateLimited, the database away), None when it is
    admitted or its route admits in a dependency (which ran before validation)."""
    route = request.scope.get("route")
    if not getattr(getattr(route, "endpoint", None), "admits_in_handler", False):
        return None
    try:
        await run_in_threadpool(admitted, request)
    except Exception as e:  # noqa: BLE001 - the caller turns it into its answer
        return e
    return None


def _admitted(request: Request, authorization: str | None) -> Client:
    tenants: Tenants = request.app.state.tenants
    if not tenants.settings.auth_required:
        tenant, budgeted = TENANT_DEFAULT, tenants.admit(TENANT_DEFAULT)
    else:
        tenant, limits = tenants.authenticate_with_limits(_bearer(authorization))
        budgeted = tenants.admit(tenant, limits)
    c = service(request).for_tenant(tenant)
    c.budgeted = budgeted
    return c


def not_found(kind: str, ident: Any) -> ApiError:
    return ApiError(404, f"no {kind} {ident!r}", code="not_found", param="id")
