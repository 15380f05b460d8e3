"""The endpoint over real HTTP (httpx): ``GET /health`` and ``POST /v1/chat/completions`` with
``stream: true``, whose answer arrives as server-sent events (``data: {chunk}`` lines, then
``data: [DONE]``; a failure mid-answer is a chunk with an ``error``)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx

from appliance.contract.errors import ApplianceError


class EndpointError(ApplianceError):
    title = "Endpoint"


def stream_chat(
    url: str, key: str, messages: list[dict[str, str]], model: str, max_tokens: int = 256, timeout: float = 120.0
) -> Iterator[str]:
    """Yield the answer's text pieces as the endpoint at ``url`` (…/v1) streams them."""
    url = url.rstrip("/") + "/chat/completions"
    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}
    try:
        with httpx.stream(
            "POST",
            url,
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(timeout, connect=3.0),
        ) as response:
            if response.status_code != 200:
                response.read()
                raise EndpointError(
                    f"the endpoint refused the question (HTTP {response.status_code}): {error_text(response)}"
                )
            yield from sse_text(response.iter_lines())
    except httpx.ConnectError:
        raise EndpointError(f"nothing answers at {url}; start it with 'appliance serve' or 'appliance run'") from None
    except httpx.HTTPError as exc:
        raise EndpointError(f"the endpoint stopped answering: {exc}") from None


def health(url: str, timeout: float = 1.0) -> str:
    """'answering (vN)', 'not running' or the HTTP problem, from a real GET /health of the endpoint at ``url``."""
    base = url.removesuffix("/").removesuffix("/v1")
    try:
        r = httpx.get(f"{base}/health", timeout=timeout)
    except httpx.HTTPError:
        return "not running"
    if r.status_code != 200:
        return f"unhealthy (HTTP {r.status_code})"
    try:
        model = r.json().get("model")
    except ValueError:
        model = None
    return f"answering ({model})" if model else "answering"


def sse_text(lines: Iterator[str]) -> Iterator[str]:
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            chunk = json.loads(data)
        except json.JSONDecodeError:
            continue
        if "error" in chunk:
            raise EndpointError(f"the model stopped: {chunk['error'].get('message', chunk['error'])}")
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or choice.get("text")
            if piece:
                yield piece


def error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
