"""OpenAI chat format: ``{"messages": [{"role": ..., "content": ...}, ...]}``."""

from __future__ import annotations

from typing import Any

from appliance.data.ingest.records import Record, validate_messages

FORMAT = "openai-messages"


def matches(obj: dict[str, Any]) -> bool:
    return "messages" in obj


def to_record(obj: dict[str, Any]) -> Record:
    return Record("chat", {"messages": validate_messages(obj["messages"])}, format=FORMAT)
