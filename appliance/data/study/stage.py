"""The study stage: each document of a snapshot turned into training conversations, once.

Between snapshot and train. For every document (text, Markdown, PDF, Word) of the
snapshot, :func:`study` loads its study material from ``store/study/<sha256>.json`` or
writes it with the model-free core (:func:`appliance.data.study.study_document`) from
the text ingest kept (``store/texts/<sha256>.txt``). Each cache file is written whole
(atomic rename), so a study killed at any point resumes with the documents not yet
done and never duplicates a conversation; a second study of the same snapshot reads
every file and generates nothing. The cache is keyed by the document's sha256 and the
settings that shape the material, so ``forget`` removes it with the document and a
changed setting rewrites it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.contract.events import Emit, Message, Progress, StageFinished, StageStarted, ignore
from appliance.data import snapshot as snapshots
from appliance.data.ingest import pdf, word
from appliance.data.ingest.kept import document_text
from appliance.data.ingest.records import Record
from appliance.data.study import study_document
from appliance.data.study.heldout import leaks
from appliance.data.study.teacher import teach, teacher_model
from appliance.home.config import Settings
from appliance.home.fsutil import read_json, write_json_atomic
from appliance.home.paths import Home
from appliance.runtime.llamacpp_child import header_problem

STAGE = "study"
# The formats ingest reads as prose documents (cut into text chunks); conversations are not studied.
DOCUMENT_FORMATS = ("text", "markdown", pdf.FORMAT, word.FORMAT)
CACHE_VERSION = 1
STUDY_FORMAT = "study"  # the format training records made here carry (statistics only)


@dataclass
class DocumentStudy:
    """One document's study material, as cached."""

    sha256: str
    path: str
    source: str  # "text": the kept text; "chunks": its chunk records joined; "none"
    counts: dict[str, int] = field(default_factory=dict)
    reason: str | None = None  # why it gives no conversations, in one sentence
    statements: list[str] = field(default_factory=list)
    conversations: list[dict] = field(default_factory=list)
    paraphrases: list[dict] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)

    def to_dict(self, key: dict[str, Any]) -> dict[str, Any]:
        return {
            "key": key,
            "sha256": self.sha256,
            "path": self.path,
            "source": self.source,
            "counts": self.counts,
            "reason": self.reason,
            "statements": self.statements,
            "conversations": self.conversations,
            "paraphrases": self.paraphrases,
            "heldout": self.heldout,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocumentStudy:
        return cls(
            data["sha256"],
            data["path"],
            data["source"],
            data["counts"],
            data["reason"],
            data["statements"],
            data["conversations"],
            data["paraphrases"],
            data["heldout"],
        )


@dataclass
class StudySet:
    """The study material of a snapshot's documents: what training adds, what the gate asks."""

    documents: list[DocumentStudy] = field(default_factory=list)
    generated: int = 0  # documents studied now (not read from the cache)

    def items(self) -> list[tuple[str, Record]]:
        """(document sha256, training record): conversations, then re-told passages."""
        out = []
        for doc in self.documents:
            out += [
                (doc.sha256, Record("chat", {"messages": c["messages"]}, format=STUDY_FORMAT))
                for c in doc.conversations
            ]
            out += [(doc.sha256, Record("text", {"text": p["text"]}, format=STUDY_FORMAT)) for p in doc.paraphrases]
        return out

    def records(self) -> list[Record]:
        return [record for _, record in self.items()]

    def heldout(self) -> dict[str, dict[str, Any]]:
        """Per document: its path, facts (statements) and held-out questions (never trained)."""
        return {
            doc.sha256: {"path": doc.path, "facts": len(doc.statements), "questions": doc.heldout}
            for doc in self.documents
        }

    def counts(self) -> dict[str, int]:
        studied = [doc for doc in self.documents if doc.conversations]
        return {
            "documents": len(self.documents),
            "documents_studied": len(studied),
            "statements": sum(len(doc.statements) for doc in self.documents),
            "conversations": sum(len(doc.conversations) for doc in self.documents),
            "paraphrases": sum(len(doc.paraphrases) for doc in self.documents),
            "unsupported_dropped": sum(doc.counts.get("unsupported", 0) for doc in self.documents),
            "teacher_written": sum(doc.counts.get("teacher_written", 0) for doc in self.documents),
            "teacher_accepted": sum(doc.counts.get("teacher_accepted", 0) for doc in self.documents),
            "heldout": sum(len(doc.heldout) for doc in self.documents),
        }

    def leaked(self) -> list[str]:
        """Held-out questions found inside this set's own training text ([] unless the core has a bug)."""
        texts = [m["content"] for doc in self.documents for c in doc.conversations for m in c["messages"]]
        texts += [p["text"] for doc in self.documents for p in doc.paraphrases]
        return leaks([q["question"] for doc in self.documents for q in doc.heldout], texts)


def cache_key(settings: Settings) -> dict[str, Any]:
    """What shapes a document's study material besides its text: a change rewrites the cache."""
    s = settings.study
    return {
        "version": CACHE_VERSION,
        "organisation": s.organisation,
        "passage_tokens": s.passage_tokens,
        "seed": s.seed,
        "base": settings.base.name,
        "teacher": [
            s.teacher,
            s.teacher_questions,
            s.teacher_min_gb,
        ],  # the setting: "auto" follows the current model, not re-studied
    }


def documents(home: Home, snapshot_id: str) -> list[dict[str, Any]]:
    """The snapshot's prose documents: sha256, path, format."""
    sources = snapshots.stats(home, snapshot_id)["by_source"]
    return [s for s in sources if s.get("format") in DOCUMENT_FORMATS]


def study(home: Home, snapshot: snapshots.Snapshot | str, settings: Settings, emit: Emit = ignore) -> StudySet:
    """Every document of ``snapshot`` studied (from the cache when it is there)."""
    snapshot_id = snapshot if isinstance(snapshot, str) else snapshot.id
    result = StudySet()
    if not settings.study.enabled:
        return result
    docs = documents(home, snapshot_id)
    key = cache_key(settings)
    counter = _TokenCounter(home, settings)
    teacher = _teacher(home, settings, emit)
    errors: list[str] = []
    emit(StageStarted(STAGE, total=len(docs), description=f"Studying {len(docs)} document(s)"))
    for done, doc in enumerate(docs, start=1):
        cached = _cached(home, doc["sha256"], key)
        if cached is None:
            cached = _generate(home, doc, settings, counter, teacher, errors)
            write_json_atomic(home.study_cache(doc["sha256"]), cached.to_dict(key))
            result.generated += 1
            if cached.reason:
                emit(
                    Message(
                        STAGE,
                        f"{doc['path']}: no study questions written: {cached.reason}; it trains as plain text only",
                        level="warning",
                    )
                )
        result.documents.append(cached)
        emit(Progress(STAGE, completed=done, total=len(docs)))
    for error in dict.fromkeys(errors):  # once per study, not per document
        emit(Message(STAGE, error, level="warning"))
    counts = result.counts()
    emit(
        StageFinished(
            STAGE,
            summary=f"{counts['statements']} facts in {len(docs)} document(s): "
            f"{counts['conversations']} study conversations, {counts['paraphrases']} "
            f"re-told passages, {counts['heldout']} questions held out",
        )
    )
    return result


def _teacher(home: Home, settings: Settings, emit: Emit) -> Path | None:
    """The teacher's GGUF, or None; a missing or malformed file is one line and no teacher."""
    model = teacher_model(home, settings.study.teacher, settings.study.teacher_min_gb)
    if model is None:
        return None
    problem = "no such file" if not model.is_file() else header_problem(model)
    if problem:
        emit(
            Message(
                STAGE, f"study teacher {model}: {problem}; the model-free questions are used alone", level="warning"
            )
        )
        return None
    return model


def _cached(home: Home, sha256: str, key: dict[str, Any]) -> DocumentStudy | None:
    path = home.study_cache(sha256)
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return None  # absent (or unreadable: written again)
    return DocumentStudy.from_dict(data) if data.get("key") == key else None


def _generate(
    home: Home,
    doc: dict[str, Any],
    settings: Settings,
    counter: _TokenCounter,
    teacher: Path | None = None,
    errors: list[str] | None = None,
) -> DocumentStudy:
    sha, path = doc["sha256"], doc["path"]
    text, source = document_text(home, sha)
    if text is None:
        return DocumentStudy(sha, path, "none", reason="its text is no longer in the store")
    material = study_document(
        text,
        sha,
        org_name=settings.study.organisation,
        count_tokens=counter,
        seed=settings.study.seed,
        max_tokens=settings.study.passage_tokens,
    )
    if teacher is not None and material.statements:
        _taught(teacher, material, settings, errors)
    for item in material.conversations + material.paraphrases + material.heldout:
        item["document"] = sha
    return DocumentStudy(
        sha,
        path,
        source,
        dict(material.counts),
        material.reason,
        [st.text for st in material.statements],
        material.conversations,
        material.paraphrases,
        material.heldout,
    )


def _taught(teacher: Path, material: Any, settings: Settings, errors: list[str] | None) -> None:
    """The teacher's accepted questions as conversations, answered with the generators' own
    full-sentence answer for the fact (so every answer stays supported by the passage)."""
    answers: dict[int, str] = {}
    for c in material.conversations:
        answers.setdefault(int(c["statement"]), c["messages"][-1]["content"])
    known = [m["content"] for c in material.conversations for m in c["messages"] if m["role"] == "user"]
    taught = teach(
        teacher,
        [st.text for st in material.statements],
        settings.study.teacher_questions,
        set(known),
        [q["question"] for q in material.heldout],
        settings.train.threads,
    )
    if taught.error and errors is not None:
        errors.append(taught.error)
    for index, questions in taught.questions.items():
        if index in answers:
            material.conversations += [
                {
                    "kind": "teacher",
                    "statement": index,
                    "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answers[index]}],
                }
                for q in questions
            ]
    material.counts["teacher_written"] = taught.written
    material.counts["teacher_accepted"] = sum(len(q) for i, q in taught.questions.items() if i in answers)


class _TokenCounter:
    """Passage lengths in base-model tokens; the tokenizer loads only when a document is studied."""

    def __init__(self, home: Home, settings: Settings):
        self.base: Path = home.base(settings.base.name)
        self._tokenize: Callable[..., Any] | None = None

    def __call__(self, text: str) -> int:
        if self._tokenize is None:
            from appliance.runtime.hf import load_tokenizer  # transformers: only when there is something to study

            self._tokenize = load_tokenizer(self.base)
        return len(self._tokenize(text, add_special_tokens=False)["input_ids"])
