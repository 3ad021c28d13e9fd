"""Endpoints for load balancers and monitoring."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.db import database_answers
from service.metrics import CONTENT_TYPE_LATEST, exposition

log = logging.getLogger(__name__)


async def healthz(request: Request) -> JSONResponse:
    if await database_answers(request.app.state.services.engine):
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "database unavailable"}, status_code=503)


async def metrics(request: Request) -> Response:
    """Prometheus exposition: this process's counters plus the queue gauges, which are read
    from the database (left out, with a warning, when it does not answer)."""
    engine = request.app.state.services.engine
    try:
        body = await exposition(engine)
    except Exception:  # a scrape must still report what this process knows
        log.warning("metrics: the queue gauges could not be read", exc_info=True)
        body = await exposition(None)
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})
