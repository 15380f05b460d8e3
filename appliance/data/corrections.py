"""Corrections flow back: a person marks an answer wrong and writes the right one; it
becomes a new conversation file in the inbox, so the next run learns from it.

The file goes to the top level of the inbox (sub-folders are collections) through a
temporary name and a rename, so the watcher never sees half of it; it is ordinary chat
data to every later stage, marked only so people can tell corrections apart.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from appliance.contract.errors import DataError
from appliance.data.ingest.records import InvalidRecord, validate_messages
from appliance.home.fsutil import write_text_atomic
from appliance.home.paths import Home


def write_correction(home: Home, messages: list[dict[str, Any]], answer: str) -> Path:
    """Save ``messages`` (ending with the user's question) + the corrected ``answer`` to the inbox."""
    if not answer.strip():
        raise DataError("a correction needs the right answer; it was empty")
    # The wrong answer, if the caller passed it along, is replaced, not kept.
    conversation = list(messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages)
    if not conversation or conversation[-1].get("role") != "user":
        raise DataError("a correction needs the conversation up to the user's question")
    try:
        cleaned = validate_messages([*conversation, {"role": "assistant", "content": answer.strip()}])
    except InvalidRecord as exc:
        raise DataError(f"the correction cannot be used: {exc}") from None
    line = json.dumps(
        {"messages": cleaned, "correction": {"by": getpass.getuser(), "time": time.time()}}, ensure_ascii=False
    )
    digest = hashlib.sha256(line.encode()).hexdigest()[:12]
    path = home.inbox / f"correction-{time.strftime('%Y%m%d-%H%M%S')}-{digest}.jsonl"
    write_text_atomic(path, line + "\n")
    return path
