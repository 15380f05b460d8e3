"""Alpaca: ``{"instruction": ..., "input": ..., "output": ...}`` (``input`` optional).

The instruction and its input become one user turn, the output the assistant's
answer, so an Alpaca example trains exactly like a one-turn chat.
"""

from __future__ import annotations

from typing import Any

from appliance.data.ingest.records import InvalidRecord, Record, validate_messages

FORMAT = "alpaca"


def matches(obj: dict[str, Any]) -> bool:
    return "instruction" in obj or "output" in obj


def to_record(obj: dict[str, Any]) -> Record:
    instruction, extra, output = obj.get("instruction"), obj.get("input", ""), obj.get("output")
    for name, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidRecord(f"'{name}' is missing or empty")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise InvalidRecord("'input' must be text")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        messages.insert(0, {"role": "system", "content": system})
    return Record("chat", {"messages": validate_messages(messages)}, format=FORMAT)
