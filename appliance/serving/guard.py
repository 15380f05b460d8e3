"""The endpoint's door: Host and Origin refusal (DNS rebinding), the bearer key on ``/v1``,
and the checks made before anything listens (bind address, the admin key file)."""

from __future__ import annotations

import logging
import socket
from ipaddress import ip_address

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from appliance.contract.errors import ApplianceError, ServeError
from appliance.home.config import Settings
from appliance.home.keys import KeyStore
from appliance.home.paths import Home
from appliance.serving.openai import error

log = logging.getLogger("appliance.serve")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
KEY_SCOPE = "appliance.key"  # where Guard leaves the authenticated Key in the ASGI scope


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: Host and Origin checks (DNS rebinding), bearer key on /v1.

    Written by hand because Starlette's TrustedHostMiddleware does not check Origin.
    The key is looked up with :meth:`KeyStore.authenticate` (constant-time compare, the
    file re-read when it changed, so a revoked key fails on its very next request) and
    left in the scope for the routes (``KEY_SCOPE``).
    """

    def __init__(self, app: ASGIApp, keys: KeyStore, allowed_hosts: set[str]):
        self.app = app
        self.keys = keys
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._refuse(scope, headers)
        if problem is not None:
            await problem(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refuse(self, scope: Scope, headers: dict[str, str]) -> Response | None:
        host = _hostname(headers.get("host", ""))
        if host not in self.allowed_hosts:
            return error(
                403,
                "this endpoint only answers requests addressed to its own host name",
                "forbidden",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and _hostname(origin.split("://", 1)[-1]) not in self.allowed_hosts:
            return error(403, "cross-origin requests are not allowed", "forbidden", code="origin_not_allowed")
        if scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            try:
                key = self.keys.authenticate(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
            except ApplianceError as exc:  # keys.json unreadable: one clear line, nobody gets in
                log.error("%s", exc)
                return error(
                    503,
                    "the endpoint cannot check API keys right now; see its log",
                    "unavailable",
                    code="keys_unreadable",
                )
            if key is None:
                return error(
                    401,
                    "missing, wrong or revoked API key; send 'Authorization: Bearer <your key>' "
                    "(an admin creates keys with 'appliance keys add')",
                    "authentication_error",
                    code="invalid_api_key",
                )
            scope[KEY_SCOPE] = key
        return None


def _hostname(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def check_bind(host: str, port: int, settings: Settings) -> None:
    if not is_loopback(host) and host != settings.serve.host:
        raise ServeError(
            f"refusing to listen on {host}: a non-loopback address must be set in config.toml [serve] host"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}); pass --port with a free port") from None


def read_api_key(home: Home) -> str:
    try:
        key = home.api_key.read_text().strip()
    except OSError:
        raise ServeError(f"{home.api_key}: API key file missing; run 'appliance init'") from None
    if not key:
        raise ServeError(f"{home.api_key}: API key file is empty")
    return key
