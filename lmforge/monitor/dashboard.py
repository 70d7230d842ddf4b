"""The built-in /dashboard page: recent aggregates as tiles and charts, no Grafana needed.

    GET /dashboard               the page (lmforge/serve/static/dashboard.html)
    GET /dashboard/dashboard.js  its script: fetches the data every few seconds, draws on <canvas>
    GET /dashboard/dashboard.css
    GET /dashboard/data          the JSON behind it: `ServerMetrics.dashboard_data()`

The page loads nothing from elsewhere (the same Content-Security-Policy as the web chat),
so it works on a machine without internet access. The JSON is the same kind of
aggregate /metrics already exposes, and is served under the same rules.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ..serve.errors import APIError
from ..serve.webui import PAGE_HEADERS, STATIC_DIR

ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}


def _finite(value: Any) -> Any:
    """NaN and infinities as null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def register_dashboard(app: FastAPI, metrics) -> None:
    """Add /dashboard, its assets and /dashboard/data (from `metrics`, a `ServerMetrics`) to `app`."""
    page = (STATIC_DIR / "dashboard.html").read_text(encoding="utf-8")
    assets = {name: (STATIC_DIR / name).read_bytes() for name in ASSETS}

    @app.get("/dashboard", include_in_schema=False)
    def dashboard():
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/dashboard/data", include_in_schema=False)
    def dashboard_data():
        return JSONResponse(_finite(metrics.dashboard_data()), headers={"Cache-Control": "no-store"})

    @app.get("/dashboard/{name}", include_in_schema=False)
    def dashboard_asset(name: str):
        if name not in assets:
            raise APIError(404, f"no dashboard file {name!r}", "not_found_error", code="not_found")
        return Response(assets[name], media_type=ASSETS[name], headers={"Cache-Control": "no-cache",
                                                                         "X-Content-Type-Options": "nosniff"})
