"""What a training run learns from: the snapshot's records and the study material rendered
with the base's chat template, the general mix, and the schedule of optimizer steps,
each packed padding-free into forward passes.

Packing: several examples share one row; ``position_ids`` restart at 0 for each and no
attention mask is passed, so transformers builds a block-causal mask and no example
attends to another (tests/test_packing.py checks it against unpacked losses).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from appliance.contract.errors import TrainError
from appliance.contract.events import Emit, Message
from appliance.data.grounded import DOES_NOT_SAY
from appliance.data.ingest.chat_jsonl import parse
from appliance.data.ingest.kept import document_text
from appliance.data.ingest.records import Record
from appliance.data.snapshot import Snapshot
from appliance.data.study import raft
from appliance.data.study.stage import STUDY_FORMAT, StudySet, study
from appliance.home.config import Settings
from appliance.home.fsutil import write_json_atomic
from appliance.home.paths import Home, RunDir
from appliance.training.render import Example, RenderError, render

STAGE = "train"


def render_all(tokenizer: Any, recs: list, settings: Settings, emit: Emit) -> list[Example]:
    out = []
    for rec in recs:
        try:
            out.append(render(tokenizer, rec, settings.data.max_tokens, settings.data.too_long))
        except RenderError as exc:
            emit(Message(STAGE, f"record {rec.hash[:12]} skipped: {exc}", level="warning"))
    return out


def general_examples(tokenizer: Any, settings: Settings, n_domain: int, emit: Emit) -> list[Example]:
    """General-purpose material (shipped, written by the team) mixed in to limit forgetting:
    everyday conversations and, in equal number, paragraphs of plain prose. The prose keeps
    the model's feel for ordinary text: a run on conversations alone still raised the 135M
    default's perplexity on general prose by x1.34 (the gate allows x1.25). Neither holds the
    gate's own general text or probes (tests/test_train.py checks)."""
    share = settings.train.general_mix
    if share <= 0:
        return []
    general = resources.files("appliance") / "data" / "general"
    with resources.as_file(general / "conversations.jsonl") as path:
        conversations = render_all(tokenizer, parse(Path(path)).records, settings, emit)
    paragraphs = [p.strip() for p in (general / "prose.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()]
    prose = render_all(tokenizer, [Record("text", {"text": p}) for p in paragraphs], settings, emit)
    want = round(share / (1 - share) * n_domain)
    rng = random.Random(settings.train.seed + 1)
    half = want // 2
    return [prose[rng.randrange(len(prose))] for _ in range(half)] + [
        conversations[rng.randrange(len(conversations))] for _ in range(want - half)
    ]


def pack(examples: list[Example], micro_tokens: int) -> list[list[Example]]:
    """Greedy in the given order: rows of at most ``micro_tokens`` tokens (a longer
    example gets a row of its own)."""
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for ex in examples:
        n = len(ex.input_ids)
        if current and used + n > micro_tokens:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += n
    if current:
        rows.append(current)
    return rows


def collate(row: list[Example], device: str) -> dict[str, Any]:
    ids: list[int] = []
    pos: list[int] = []
    labels: list[int] = []
    for ex in row:
        ids.extend(ex.input_ids)
        pos.extend(range(len(ex.input_ids)))
        labels.extend(ex.labels)
    as_tensor = lambda xs: torch.tensor([xs], dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_tensor(ids), "position_ids": as_tensor(pos), "labels": as_tensor(labels)}


def plan_steps(examples: list[Example], epochs: float, tokens_per_step: int, seed: int) -> list[list[Example]]:
    """The whole schedule up front: each step is the examples it trains on, about
    ``tokens_per_step`` tokens. Fixed by the seed, so a resumed run continues the
    same schedule. How a step is cut into forward passes is decided when it runs."""
    rng = random.Random(seed)
    stream: list[Example] = []
    for epoch in range(math.ceil(epochs)):
        order = examples[:]
        rng.shuffle(order)
        fraction = epochs - epoch
        if fraction < 1:
            order = order[: max(1, int(len(order) * fraction))]
        stream.extend(order)
    steps: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for ex in stream:
        if current and used + len(ex.input_ids) > tokens_per_step:
            steps.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex.input_ids)
    if current:
        steps.append(current)
    return steps


def study_records(
    home: Home,
    snapshot: Snapshot,
    own: list,
    settings: Settings,
    run: RunDir,
    emit: Emit,
    keep: Callable[[list[tuple[str, Record]]], list[tuple[str, Record]]] | None = None,
) -> tuple[list, dict[str, int]]:
    """The study stage's conversations and re-told passages for the snapshot's documents (read
    from its cache), and their counts; the held-out questions go to ``heldout.json`` for the gate.
    ``keep`` picks which (document sha256, record) pairs train (an incremental run's new
    documents and a replay of the others); the gate's held-out questions stay every document's.

    A held-out question inside the study material itself fails the run (it would no longer
    test recall); one that the snapshot's own conversations happen to ask is dropped from
    the held-out set instead, and counted.
    """
    material = study(home, snapshot, settings, emit)
    leaked = material.leaked()
    if leaked:
        raise TrainError(
            f"snapshot {snapshot.id}: {len(leaked)} held-out study question(s) are in the training "
            f"material (first: {leaked[0]!r}); delete {home.study} to write it again"
        )
    asked = {
        _norm(m["content"])
        for rec in own
        if rec.kind == "chat"
        for m in rec.body.get("messages", [])
        if m.get("role") == "user"
    }
    heldout = material.heldout()
    dropped = 0
    for doc in heldout.values():
        kept = [q for q in doc["questions"] if _norm(q["question"]) not in asked]
        dropped += len(doc["questions"]) - len(kept)
        doc["questions"] = kept
    cited = _raft(home, material, heldout, settings)
    write_json_atomic(run.heldout, {"snapshot": snapshot.id, "documents": heldout})
    counts = {
        **material.counts(),
        "heldout": sum(len(d["questions"]) for d in heldout.values()),
        "heldout_in_your_data": dropped,
        "raft": len(cited),
        "raft_does_not_say": sum(r.body["messages"][-1]["content"] == DOES_NOT_SAY for _, r in cited),
        "raft_counterfactual": sum(bool(r.body.get("counterfactual")) for _, r in cited),
    }
    items = material.items() + cited
    if keep is not None:
        items = keep(items)
        counts["trained"] = len(items)
    return [record for _, record in items], counts


def _raft(home: Home, material: StudySet, heldout: dict[str, dict], settings: Settings) -> list[tuple[str, Record]]:
    """Grounded conversations per fact (data/study/raft.py), and each held-out question's
    retrieved passages for the gate's open-book recall."""
    studied = [d for d in material.documents if d.conversations]
    if not studied:
        return []
    docs = []
    for d in studied:
        text, _ = document_text(home, d.sha256)
        if text:
            docs.append(raft.Document(d.sha256, d.path, text))
    grounding = settings.grounding
    word_vectors = grounding.word_vectors and not grounding.embedding_model  # as the endpoint retrieves
    with raft.Retrieval(docs, home.store, grounding.passages, word_vectors) as retrieval:
        raft.open_book(retrieval, heldout)
        if not settings.study.raft:
            return []
        study = settings.study
        shares = raft.Shares(
            none=study.raft_none_share,
            unanswerable=study.raft_unanswerable_share,
            memory=study.raft_memory_share,
            questions=study.raft_questions,
            swapped=study.raft_swap_share,
            shuffled=study.raft_shuffle,
        )
        made = raft.conversations(retrieval, studied, study.seed, shares)
    return [(sha, Record("chat", conversation, format=STUDY_FORMAT)) for sha, conversation in made]


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))
