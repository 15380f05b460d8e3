"""The endpoint over real HTTP (httpx): ``GET /health`` and ``POST /v1/chat/completions`` with
``stream: true``, whose answer arrives as server-sent events (``data: {chunk}`` lines, then
``data: [DONE]``; a failure mid-answer is a chunk with an ``error``).

Grounded answers (issue 18): the chunk that finishes a choice also carries top-level ``sources``
(the passages the answer cites as [1], [2], …) and ``grounding`` (whether retrieval was used, and
why not); a caller passes an :class:`Answer` to receive them. ``"grounding": false`` in the request
asks the model alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from appliance.contract.errors import ApplianceError


class EndpointError(ApplianceError):
    title = "Endpoint"


@dataclass(frozen=True)
class Source:
    """A passage the answer used; ``id`` is the number the answer cites it by ([1])."""

    id: int
    document: str
    sha256: str
    passage: str
    score: float | None = None


@dataclass(frozen=True)
class Grounding:
    """Whether the answer came from the collection's documents; ``reason`` says why not."""

    used: bool
    reason: str | None = None
    collection: str | None = None


@dataclass
class Answer:
    """What one streamed answer said: its text, and the sources and grounding its final chunk carried
    (none from an endpoint that predates grounding)."""

    text: str = ""
    sources: list[Source] = field(default_factory=list)
    grounding: Grounding | None = None

    def take(self, chunk: dict[str, Any]) -> None:
        """Read ``sources`` and ``grounding`` from a chunk or a whole (non-streamed) chat.completion."""
        if isinstance(chunk.get("sources"), list):
            self.sources = [s for i, item in enumerate(chunk["sources"], 1) if (s := _source(item, i)) is not None]
        if isinstance(chunk.get("grounding"), dict):
            g = chunk["grounding"]
            self.grounding = Grounding(
                bool(g.get("used")), _text_or_none(g.get("reason")), _text_or_none(g.get("collection"))
            )


def _source(item: Any, position: int) -> Source | None:
    """One entry of ``sources``; a malformed one is skipped rather than failing the whole answer."""
    if not isinstance(item, dict):
        return None
    number, score = item.get("id"), item.get("score")
    return Source(
        number if isinstance(number, int) else position,
        str(item.get("document") or "?"),
        str(item.get("sha256") or ""),
        str(item.get("passage") or ""),
        float(score) if isinstance(score, (int, float)) else None,
    )


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def stream_chat(
    url: str,
    key: str,
    messages: list[dict[str, str]],
    model: str,
    max_tokens: int = 256,
    timeout: float = 120.0,
    grounding: bool = True,
    answer: Answer | None = None,
) -> Iterator[str]:
    """Yield the answer's text pieces as the endpoint at ``url`` (…/v1) streams them; ``answer``, when
    given, receives the text, sources and grounding. ``grounding=False`` asks the model alone."""
    url = url.rstrip("/") + "/chat/completions"
    body: dict[str, Any] = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens}
    if not grounding:  # absent means the endpoint's default (grounded when the collection has documents)
        body["grounding"] = False
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
            yield from sse_text(response.iter_lines(), answer)
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


def sse_text(lines: Iterator[str], answer: Answer | None = None) -> Iterator[str]:
    """The text pieces of an SSE chat stream; ``answer``, when given, also collects the text and the
    sources and grounding of the chunk that finishes the answer."""
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
        if answer is not None:
            answer.take(chunk)
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") or choice.get("text")
            if piece:
                if answer is not None:
                    answer.text += piece
                yield piece


def error_text(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
