"""Per-key use of the endpoint, summed in memory and written to the audit log."""

from __future__ import annotations

import hashlib
import logging
import threading
import time

from appliance.home import audit
from appliance.home.paths import Home

log = logging.getLogger("appliance.serve")


class KeyUse:
    """Requests per (key, model) since the last flush, written to the audit log as ``key_use``
    entries: which key used which model when, with counts; never prompt or answer text."""

    def __init__(self, home: Home):
        self.home = home.top
        self._counts: dict[tuple[str, str], dict] = {}
        self._users: dict[tuple[str, str], set[str]] = {}  # hashes of clients' 'user' fields, kept in memory only
        self._lock = threading.Lock()

    def record(self, key: str, model: str, prompt: object, completion: object, user: str | None = None) -> None:
        """Count one request; a client's ``user`` only as how many different ones there were."""
        now = time.time()
        with self._lock:
            if user:
                self._users.setdefault((key, model), set()).add(hashlib.sha256(user.encode()).hexdigest())
            entry = self._counts.setdefault(
                (key, model), {"requests": 0, "first": now, "last": now, "prompt_tokens": 0, "completion_tokens": 0}
            )
            entry["requests"] += 1
            entry["last"] = now
            entry["prompt_tokens"] += prompt if isinstance(prompt, int) else 0
            entry["completion_tokens"] += completion if isinstance(completion, int) else 0

    def flush(self) -> int:
        """Write and forget what was counted; returns the number of entries written."""
        with self._lock:
            counts, self._counts = self._counts, {}
            users, self._users = self._users, {}
        for (key, model), entry in sorted(counts.items()):
            if (key, model) in users:
                entry["users"] = len(users[(key, model)])
            try:
                audit.append(self.home, "key_use", key=key, model=model, **entry)
            except OSError as exc:  # the endpoint keeps answering; the log says what was lost
                log.error(
                    "could not write key use to the audit log (%s): key=%s model=%s requests=%d",
                    exc,
                    key,
                    model,
                    entry["requests"],
                )
        return len(counts)
