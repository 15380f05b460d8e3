"""The unit of training data, and the checks every record passes before it is stored."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One training example: a chat conversation or a chunk of document text."""

    kind: Literal["chat", "text"]
    body: dict[str, Any]
    # Where it came from ("sharegpt", "pdf" ...): for statistics only, not part of its identity.
    format: str = field(default="", compare=False)

    def canonical(self) -> str:
        return json.dumps({"kind": self.kind, **self.body}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))

    @property
    def hash(self) -> str:
        """Content address: identical content from any file is one record."""
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()


class InvalidRecord(ValueError):
    """A record that cannot be used; the message is one plain sentence."""


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Return the conversation cleaned to role/content pairs, or raise InvalidRecord."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRecord("'messages' must be a non-empty list")
    cleaned: list[dict[str, str]] = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise InvalidRecord(f"turn {i + 1} is not an object")
        role, content = turn.get("role"), _text(turn.get("content"))
        if role not in ROLES:
            raise InvalidRecord(f"turn {i + 1} has unknown role {role!r} (expected system, user or assistant)")
        if role == "system" and i != 0:
            raise InvalidRecord(f"turn {i + 1}: a system message may only come first")
        if not isinstance(content, str) or not content.strip():
            raise InvalidRecord(f"turn {i + 1} ({role}) has empty or non-text content")
        cleaned.append({"role": role, "content": content})
    if cleaned[-1]["role"] != "assistant":
        raise InvalidRecord("the conversation does not end with an assistant turn")
    if not any(t["role"] == "user" for t in cleaned):
        raise InvalidRecord("the conversation has no user turn")
    return cleaned


def _text(content: Any) -> Any:
    """OpenAI's list-of-parts content, when every part is text, as one string."""
    if (
        isinstance(content, list)
        and content
        and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content
        )
    ):
        return "".join(part["text"] for part in content)
    return content
