"""What every route shares: the service's client, the caller's tenant, and errors in
the OpenAI shape ({"error": {"message", "type", "param", "code"}}) naming the field."""
from __future__ import annotations

from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from worker.client import Client
from worker.submit import TENANT_DEFAULT


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(status, message, headers=headers)
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def service(request: Request) -> Client:
    return request.app.state.client


def caller(request: Request) -> Client:
    """The service's client acting for the caller's tenant (set by the auth middleware)."""
    tenant = getattr(request.state, "tenant", None) or TENANT_DEFAULT
    return service(request).for_tenant(tenant)


def not_found(kind: str, ident: Any) -> ApiError:
    return ApiError(404, f"no {kind} {ident!r}", code="not_found", param="id")
