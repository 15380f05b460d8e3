"""Probe questions with expected key phrases, asked through the real endpoint.

A probe file is JSONL: ``{"question": "...", "expected": ["phrase", ...]}``. An answer
counts as correct when it contains any expected phrase (case-insensitive).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import httpx

from appliance.contract.errors import DataError


@dataclass(frozen=True)
class Probe:
    question: str
    expected: list[str]

    def hit(self, answer: str) -> bool:
        low = answer.lower()
        return any(phrase.lower() in low for phrase in self.expected)


def load(path: Path) -> list[Probe]:
    probes = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            probes.append(Probe(str(obj["question"]), [str(p) for p in obj["expected"]]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f'{path}: line {number}: expected {{"question": ..., "expected": [...]}}') from None
    return probes


def ask(client: httpx.Client, model: str, question: str, max_tokens: int = 48) -> str:
    response = client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "temperature": 0.0,
            "max_tokens": max_tokens,
            "seed": 0,
        },
    )
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"] or ""


def endpoint_client(url: str, api_key: str, timeout: float = 120) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout)
