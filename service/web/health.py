"""Endpoints for load balancers and monitoring."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse

from service.db import database_answers


async def healthz(request: Request) -> JSONResponse:
    if await database_answers(request.app.state.services.engine):
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "database unavailable"}, status_code=503)
