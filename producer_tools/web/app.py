"""The gateway's web application: one page, its static assets, a health check, the websocket.

``serve`` runs it under uvicorn with the transport's own bound on message size (a frame over it
closes the socket before it is buffered), just above the gateway's ``max_message_bytes``, whose
check gives the page a readable message.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Final

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from producer_tools.web.admission import SessionSlots
from producer_tools.web.session import serve_session
from producer_tools.web.settings import GatewaySettings

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"
# A control message (JSON) fits in this much on top of the audio limit.
TRANSPORT_SLACK_BYTES: Final = 1024

log = logging.getLogger(__name__)


def create_app(settings: GatewaySettings) -> Starlette:
    """The ASGI application for ``settings``."""
    slots = SessionSlots(settings.max_sessions)

    async def index(_request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "sessions": slots.in_use, "max_sessions": slots.limit})

    async def websocket(ws: WebSocket) -> None:
        await serve_session(ws, settings, slots)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/healthz", healthz),
            WebSocketRoute("/ws", websocket),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
    )
    app.state.slots = slots
    return app


def uvicorn_config(settings: GatewaySettings, log_level: str = "info") -> uvicorn.Config:
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_message_bytes + TRANSPORT_SLACK_BYTES,
        log_level=log_level,
        access_log=False,
        lifespan="off",
    )


def serve(settings: GatewaySettings, announce: Callable[[str], None]) -> None:
    """Listen (``OSError`` if the address is taken), ``announce`` the URL, serve until stopped."""
    sock = socket.create_server((settings.host, settings.port))
    host, port = sock.getsockname()[:2]
    announce(f"http://{f'[{host}]' if ':' in host else host}:{port}/")
    uvicorn.Server(uvicorn_config(settings)).run(sockets=[sock])
