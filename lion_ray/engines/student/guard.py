"""Who may use a replica, and how large a request may be: keys that fail closed, a body limit.

Access fails closed: when ``serve.api_keys_env``/``serve.admin_keys_env`` are set, the
deploying process reads the keys and hands replicas their digests (so a replica on a node
without the variable still checks keys); a missing variable stops the deployment. A server
without keys binds only a loopback address unless ``serve.allow_unauthenticated``.
"""

import json
import os
from importlib import resources

from fastapi import Request

from lion_ray.config import ServeConfig
from lion_ray.engines.student.wire import ServeError, error_body
from lion_ray.errors import LionError
from lion_ray.logic.access import Access, is_loopback, read_key_digests

# What the middleware and the key check need from the replica's settings. One replica per
# process, so module state is the replica's. The deployment class is pickled by value (so
# its methods see copies of this module's globals); `configure_replica` is pickled by
# reference and so writes to the module the middleware reads.
REPLICA: dict = {"max_body_bytes": ServeConfig().max_body_bytes, "access": Access()}


def resolve_access(settings: ServeConfig, environ=os.environ) -> dict[str, list[str]]:
    """Read the configured keys where the server is deployed (fail closed) and check the bind
    address; returns the key digests the replicas get."""
    digests = {"user": [], "admin": []}
    if settings.api_keys_env:
        digests["user"] = read_key_digests(environ, settings.api_keys_env, "api_keys_env")
    if settings.admin_keys_env:
        digests["admin"] = read_key_digests(environ, settings.admin_keys_env, "admin_keys_env")
    if (
        not digests["user"]
        and not settings.allow_unauthenticated
        and not is_loopback(settings.host)
    ):
        raise LionError(
            f"serve.host is {settings.host!r}, reachable from other machines, but no keys are "
            "configured: set serve.api_keys_env (and serve.admin_keys_env) to a variable "
            "holding keys, or pass --allow-unauthenticated (serve.allow_unauthenticated=true) "
            "to serve without keys on purpose"
        )
    return digests


def configure_replica(settings: ServeConfig, digests: dict | None) -> None:
    """Install this replica's limits and key digests; a replica whose config names keys but
    that was given none refuses to start (the deployment then fails, and says why)."""
    digests = digests or {}
    for setting, kind in (("api_keys_env", "user"), ("admin_keys_env", "admin")):
        if getattr(settings, setting) and not digests.get(kind):
            raise LionError(
                f"serve.{setting} is set but this replica received no {kind} keys: deploy "
                "through lion_ray.engines.student.app (deploy, student_app or build_app), "
                "which reads them where the deployment starts; refusing to serve without them"
            )
    REPLICA["max_body_bytes"] = settings.max_body_bytes
    REPLICA["access"] = Access(
        user=frozenset(digests.get("user", ())), admin=frozenset(digests.get("admin", ()))
    )


class BodyLimit:
    """ASGI middleware: refuse bodies over the replica's limit (declared or streamed) with 413.

    The limit is read from ``REPLICA`` at request time, which each replica's constructor sets
    through ``configure_replica``."""

    def __init__(self, app):
        self.app = app

    @property
    def limit(self) -> int:
        return REPLICA["max_body_bytes"]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and int(declared) > self.limit:
            return await self._too_large(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            return await self.app(scope, limited, send)
        except _TooLarge:
            return await self._too_large(send)

    async def _too_large(self, send):
        body = json.dumps(
            error_body(
                f"request body is larger than {self.limit} bytes",
                "invalid_request_error",
                "request_too_large",
            )
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


OPEN_BANNER = (
    '<p class="warning" id="open-server">This server runs without authentication: anyone who '
    "can reach it can use it (set serve.api_keys_env).</p>"
)


def page() -> str:
    """The chat page, with a warning when the server answers anyone."""
    page = resources.files("lion_ray").joinpath("serving_static/index.html").read_text()
    return page.replace("<!--ACCESS-->", OPEN_BANNER if REPLICA["access"].open else "")


def check_key(request: Request) -> None:
    if REPLICA["access"].check_user(request.headers.get("authorization", "")) != 200:
        raise ServeError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            "invalid_request_error",
            "invalid_api_key",
        )


def check_admin(request: Request) -> None:
    status, reason = REPLICA["access"].check_admin(request.headers.get("authorization", ""))
    if status != 200:
        code = "invalid_api_key" if status == 401 else "permission_denied"
        raise ServeError(status, reason, "invalid_request_error", code)
