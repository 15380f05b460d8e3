"""``appliance ask``: one question to a collection's current model, answered the way the
endpoint answers it (grounded in the collection's documents, with sources, unless asked
not to), because it *is* the endpoint: the running daemon's, or, when none is running, one
started for the question on a free loopback port and stopped after it."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from appliance.contract.errors import ServeError
from appliance.contract.names import model_id
from appliance.home.config import Settings
from appliance.home.paths import Home

TIMEOUT_S = 600.0  # a first answer may wait for llama-server to load the model


def ask(
    home: Home,
    settings: Settings,
    secret: str,
    question: str,
    collection: str = "",
    grounding: bool = True,
    endpoint: str | None = None,
    max_tokens: int = 256,
) -> dict[str, Any]:
    """The answer: text, model, sources and grounding status (the endpoint's fields)."""
    body: dict[str, Any] = {
        "model": model_id(collection),
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if not grounding:
        body["grounding"] = False
    with _endpoint(home, settings, endpoint) as url:
        reply = httpx.post(
            f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=TIMEOUT_S
        )
    payload = reply.json() if reply.headers.get("content-type", "").startswith("application/json") else {}
    if reply.status_code != 200:
        message = (payload.get("error") or {}).get("message") or reply.text[:300]
        raise ServeError(f"the endpoint refused the question (HTTP {reply.status_code}): {message}")
    return {
        "answer": payload["choices"][0]["message"].get("content") or "",
        "model": payload.get("model"),
        "sources": payload.get("sources", []),
        "grounding": payload.get("grounding"),
        "usage": payload.get("usage"),
    }


@contextmanager
def _endpoint(home: Home, settings: Settings, running: str | None) -> Iterator[str]:
    if running and _healthy(running):
        yield running.rstrip("/")
        return
    from appliance.serving.server import Server  # the web stack loads only when no endpoint runs

    server = Server(home.top, settings, host="127.0.0.1", port=_free_port()).start()
    try:
        yield server.url + "/v1"
    finally:
        server.stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url.rstrip("/").removesuffix("/v1") + "/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
