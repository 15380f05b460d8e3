"""Probe questions kept out of training: training drops every record that holds a probe
question or a near-duplicate of one, so a probe score measures what the model learned,
not what it memorised (the data advisor reports the same leaks before a run).

Near-duplicates are found by word-trigram containment: the share of a probe
question's trigrams that one training text holds. It is written here rather than
taken from a fuzzy-matching library because it must be exact (a hashed sketch such as
MinHash can miss a short question), must compare a short question with a long
document chunk (containment, not similarity of the two), and is a dozen lines with an
inverted index, linear in the data.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.data.ingest.records import Record
from appliance.home.paths import Home

# A probe counts as leaked when a training text holds this share of its word trigrams.
# The clinic probes are paraphrases of their facts' training questions and reach at
# most 0.36 against them; a copied question with a word changed stays above 0.7.
CONTAINMENT = 0.7
GENERAL_PROBES = Path(__file__).parent / "general" / "probes.jsonl"


@dataclass(frozen=True)
class Leak:
    record: str  # record hash
    probe: str  # the probe question
    source: str  # the probe file
    containment: float


# --- near-duplicates ---------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", text.lower())


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = _words(text)
    if len(words) < 3:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + 3]) for i in range(len(words) - 2)}


def record_texts(record: Record) -> list[str]:
    """The texts of a record a probe question could leak into: user turns, or a document chunk."""
    if record.kind == "text":
        return [record.body.get("text", "")]
    return [m["content"] for m in record.body.get("messages", []) if m.get("role") in ("user", "system")]


def find_leaks(records: Sequence[Record], probes: Sequence[tuple[str, str]]) -> list[Leak]:
    """Every (record, probe question) pair where the record holds the question or a near-duplicate.

    ``probes`` are (question, source file) pairs.
    """
    index: dict[tuple[str, ...], set[int]] = defaultdict(set)
    for i, record in enumerate(records):
        for text in record_texts(record):
            for gram in _trigrams(text):
                index[gram].add(i)
    leaks = []
    for question, source in probes:
        grams = _trigrams(question)
        if not grams:
            continue
        hits = Counter(i for gram in grams for i in index.get(gram, ()))
        for i, n in hits.items():
            if n / len(grams) >= CONTAINMENT:
                leaks.append(Leak(records[i].hash, question, source, round(n / len(grams), 3)))
    return leaks


def probe_questions(home: Home) -> list[tuple[str, str]]:
    """The home's probe questions (``probes/*.jsonl``) and the shipped general-skills probes."""
    files = sorted(home.probes.glob("*.jsonl")) if home.probes.exists() else []
    out = []
    for path in [*files, GENERAL_PROBES]:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                question = json.loads(line).get("question")
            except (ValueError, AttributeError):
                continue  # a bad probe line is the probe loader's to report
            if isinstance(question, str) and question.strip():
                out.append((question, path.name))
    return out


def decontaminate(home: Home, records: list[Record]) -> tuple[list[Record], list[Leak]]:
    """Training records without those that hold a probe question, and what was removed."""
    leaks = find_leaks(records, probe_questions(home))
    leaked = {leak.record for leak in leaks}
    return [r for r in records if r.hash not in leaked], leaks
