"""ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}``.

Exports name the speakers in several ways; the usual names are mapped to the
three roles training knows. Tool and function turns are not supported: such a
conversation is rejected with the speaker named, rather than trained wrongly.
"""

from __future__ import annotations

from typing import Any

from appliance.data.ingest.records import InvalidRecord, Record, validate_messages

FORMAT = "sharegpt"
SPEAKERS = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}


def matches(obj: dict[str, Any]) -> bool:
    return "conversations" in obj


def to_record(obj: dict[str, Any]) -> Record:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise InvalidRecord("'conversations' must be a non-empty list")
    messages = [_turn(i, turn) for i, turn in enumerate(turns, start=1)]
    system = obj.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return Record("chat", {"messages": validate_messages(messages)}, format=FORMAT)


def _turn(number: int, turn: Any) -> dict[str, Any]:
    if not isinstance(turn, dict):
        raise InvalidRecord(f"turn {number} is not an object")
    speaker = turn.get("from")
    role = SPEAKERS.get(speaker.lower()) if isinstance(speaker, str) else None
    if role is None:
        raise InvalidRecord(f"turn {number} has unknown speaker {speaker!r} (expected human, gpt or system)")
    return {"role": role, "content": turn.get("value")}
