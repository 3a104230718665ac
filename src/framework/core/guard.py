"""What makes the reward server (framework.serve) safe to expose, around LitServe: a guard in front of every endpoint
(the API key, the body's size), FastAPI's refusals of a body as one-line 400s, and processes that end with the
server however it ends."""

import ctypes
import os
import secrets
import signal
import sys
import threading
import time

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class Guard:
    """ASGI middleware in front of every endpoint: the API key (401, checked before the body is read; /health needs
    none, so health probes and a client's readiness check work without it) and the size of the body (413)."""

    def __init__(self, app, key: str | None, max_bytes: int):
        self.app, self.key, self.max_bytes = app, key, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and scope["path"] != "/health":
            if not secrets.compare_digest(headers.get(b"authorization", b""), b"Bearer " + self.key.encode()):
                detail = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                return await JSONResponse({"detail": detail}, status_code=401)(scope, receive, send)
        too_large = f"request too large: the body exceeds serve.max_request_mb={self.max_bytes / 2**20:g}"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await JSONResponse({"detail": too_large}, status_code=413)(scope, receive, send)
        received = 0

        async def limited():  # a body sent without a length, counted as it arrives
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


async def malformed_body(request, e: RequestValidationError):
    """FastAPI's 422 for a body that is not a JSON object, as the 400 with one line the docs promise."""
    kind = (e.errors() or [{}])[0].get("type")
    why = {"json_invalid": "not valid JSON", "missing": "empty"}.get(kind, "not a JSON object")
    detail = f'malformed request: the body is {why}; send {{"prompts": [...], "images": {{...}}}}'
    return JSONResponse({"detail": detail}, status_code=400)


def die_with_parent(parent: int) -> None:
    """End this process when `parent` ends, however it ends (SIGKILL included), so that a stopped server leaves no
    worker behind: Linux's parent-death signal, elsewhere a thread watching the parent."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    else:

        def watch():
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent:  # it ended before the signal was armed
        os._exit(1)


def forked_child() -> None:
    """In each process the server forks: end with the server, and take signals as Python does by default (not the
    server's handlers: the HTTP processes re-raise the signal that stopped them)."""
    die_with_parent(os.getppid())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
