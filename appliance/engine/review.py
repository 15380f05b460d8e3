"""Human review before promotion (``[gate] promotion = "review"``).

A training candidate that passed the automatic gate is registered as a version but
not made current; its job waits in the journal as ``awaiting_review`` (the daemon
goes on with other work). The review is built once and stored in
``runs/<id>/review.json``: questions (the snapshot's validation conversations,
else the home's probes) answered greedily by the current and the candidate model
in llama.cpp child processes; per item the two answers are shown as A and B in a
random order that is stored but not shown until the reviewer has voted.

Each OS user votes once per candidate: approve or reject, a comment, and optionally
which answer they preferred per item. Every vote goes into the audit log. When the
approvals reach ``gate.approvals`` the review reports the approval and the engine
resumes the job through the pipeline's own promote stage
(:func:`appliance.engine.pipeline.vote`), so lineage and the registry's atomic
pointer swap are the same as an automatic promotion; one rejection refuses the job
and keeps the current model.

Forget jobs are not held for review: they remove a document from the served model,
which must not wait for a vote.
"""

from __future__ import annotations

import fcntl
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from appliance.contract.errors import ApplianceError
from appliance.data.snapshot import load as load_snapshot
from appliance.data.snapshot import records
from appliance.engine.candidates import clean_intermediates, register_candidate
from appliance.home import audit, registry
from appliance.home.catalog import served
from appliance.home.config import Settings
from appliance.home.fsutil import read_json, write_json_atomic
from appliance.home.journal import AWAITING_REVIEW, Job, Journal
from appliance.home.paths import Home
from appliance.quality.gate import models, user_probes
from appliance.runtime import llamacpp_child

PENDING, APPROVED, REJECTED = "pending", "approved", "rejected"
SIDES = ("a", "b")


class ReviewError(ApplianceError):
    title = "Review"


def load(home: Home, run_id: str) -> dict[str, Any] | None:
    path = home.run(run_id).review
    return read_json(path) if path.exists() else None


def waits(home: Home, settings: Settings, job: Job) -> bool:
    """Whether this job's promotion must wait for reviewers (not yet approved)."""
    if settings.gate.promotion != "review" or job.kind != "train":
        return False
    data = load(home, job.run_id or "")
    return not (data and data["state"] == APPROVED)


def summary(home: Home, run_id: str) -> dict[str, Any] | None:
    """The review's outcome for lineage: votes (who, what, comment), without the answers."""
    data = load(home, run_id)
    if data is None:
        return None
    return {
        "state": data["state"],
        "approvals_needed": data["approvals_needed"],
        "votes": [{k: v[k] for k in ("user", "approve", "comment", "at")} for v in data["votes"]],
    }


# --- building the review ---------------------------------------------------------------------


def open_review(home: Home, settings: Settings, journal: Journal, job: Job) -> Job:
    """Register the candidate (not current), build its review once, and park the job."""
    run_id = job.run_id or ""
    record = register_candidate(home, settings, journal, job)
    if load(home, run_id) is None:
        current = registry.current(home)
        items = build_items(home, settings, job, record["version"], current)
        write_json_atomic(
            home.run(run_id).review,
            {
                "run": run_id,
                "job": job.id,
                "candidate": record["version"],
                "current": current,
                "created": time.time(),
                "approvals_needed": settings.gate.approvals,
                "state": PENDING,
                "items": items,
                "votes": [],
            },
        )
        audit.append(
            home,
            "review_opened",
            job=job.id,
            run=run_id,
            version=record["version"],
            current=current,
            questions=len(items),
            approvals_needed=settings.gate.approvals,
        )
    clean_intermediates(home, run_id)  # checkpoints and merged weights need not wait days for a vote
    return journal.await_review(job.id, f"candidate {record['version']} waits for review")


def questions(home: Home, snapshot_id: str | None, count: int) -> list[list[dict[str, str]]]:
    """Conversations to ask, each ending with a user turn: validation chats, else the home's probes."""
    found: list[list[dict[str, str]]] = []
    if snapshot_id:
        val = sorted(load_snapshot(home, snapshot_id).val)
        for record in records(home, val):
            if len(found) >= count:
                break
            if record.kind == "chat" and (prompt := _prompt(record.body.get("messages", []))):
                found.append(prompt)
    if not found:
        found = [[{"role": "user", "content": p.question}] for p in user_probes(home)[:count]]
    if not found:
        raise ReviewError(
            "nothing to ask the reviewers: the snapshot has no validation conversations and the "
            f"home's {home.probes} has no probe questions; add a probes/*.jsonl file"
        )
    return found


def _prompt(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The conversation up to (and with) its last user turn: what the models are asked."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages[: last_user + 1]]


def build_items(home: Home, settings: Settings, job: Job, candidate: str, current: str | None) -> list[dict[str, Any]]:
    """Questions answered by both models; each item's A/B order drawn at random and stored."""
    from appliance.runtime.hf import load_tokenizer  # transformers: only building a review loads it

    asked = questions(home, job.snapshot, settings.gate.review_questions)
    now = served(home, home.collection, candidate)  # a collection's adapter is asked on the base, as served
    cand_model = (now.gguf, now.adapter) if now else (registry.gguf_path(home, candidate), None)
    prompts = _chat_ids(cand_model[0], asked, settings)
    tokenizer = load_tokenizer(home.base(settings.base.name))
    cand = _answers(cand_model, prompts, settings, tokenizer)
    _, _, cur_model = models(home, job.run_id or "", settings, against=current)  # a new collection: the base
    cur = (
        _answers(cur_model, prompts, settings, tokenizer)
        if cur_model
        else ["(there is no current model)"] * len(prompts)
    )
    chooser = random.SystemRandom()  # reviewers must not be able to predict the order
    items = []
    for index, (conversation, answer_cand, answer_cur) in enumerate(zip(asked, cand, cur)):
        a_is_candidate = chooser.random() < 0.5
        items.append(
            {
                "index": index,
                "question": conversation[-1]["content"],
                "context": conversation[:-1],
                "answer_a": answer_cand if a_is_candidate else answer_cur,
                "answer_b": answer_cur if a_is_candidate else answer_cand,
                "a": "candidate" if a_is_candidate else "current",
            }
        )
    return items


def _chat_ids(model: Path, conversations: list[list[dict[str, str]]], settings: Settings) -> list[list[int]]:
    """The ids the endpoint would feed the model (its chat template, read from the file)."""
    result = llamacpp_child.run(model, chat=conversations, threads=settings.train.threads)
    if not result.ok:
        raise ReviewError(f"cannot prepare the review questions: {result.error}")
    return result.chat


def _answers(
    model: tuple[Path, Path | None], prompts: list[list[int]], settings: Settings, tokenizer: Any
) -> list[str]:
    """Greedy answers of a model file (with the LoRA adapter it is served with, if any)."""
    result = llamacpp_child.run(
        model[0],
        generate=[(ids, settings.gate.review_tokens) for ids in prompts],
        lora=model[1],
        threads=settings.train.threads,
        timeout=1800,
    )
    if not result.ok:
        raise ReviewError(
            f"llama.cpp could not answer the review questions with {model[1] or model[0]}: {result.error}"
        )
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in result.generated]


# --- the queue and the votes ---------------------------------------------------------------------


def pending(home: Home, settings: Settings, user: str | None = None) -> list[dict[str, Any]]:
    """Candidates waiting for votes, with their items; which answer is which only for a
    reviewer who has voted already."""
    if not home.jobs_db.exists():
        return []
    user = user or audit.user()
    needed = settings.gate.approvals
    with Journal(home.jobs_db) as journal:
        jobs = journal.awaiting_review()
    out = []
    for job in jobs:
        data = load(home, job.run_id or "")
        if data is None:
            continue
        voted = next((v for v in data["votes"] if v["user"] == user), None)
        entry = {
            "run": data["run"],
            "job": data["job"],
            "created": data["created"],
            "state": data["state"],
            "stale": registry.current(home) != data["current"],  # another version was promoted since
            "approvals": _approvals(data),
            "approvals_needed": needed,
            "voters": [v["user"] for v in data["votes"]],
            "voted": voted is not None,
            "items": [
                {
                    "index": i["index"],
                    "question": i["question"],
                    "context": i["context"],
                    "answer_a": i["answer_a"],
                    "answer_b": i["answer_b"],
                }
                for i in data["items"]
            ],
        }
        if voted is not None:
            entry.update(_reveal(data))
        out.append(entry)
    return out


def record_vote(
    home: Home,
    settings: Settings,
    run_id: str,
    approve: bool,
    comment: str = "",
    preferences: dict[int, str] | None = None,
    on_approved: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Record this OS user's vote and report the outcome: a rejection refuses the job here; on
    enough approvals the state is "approved" and ``on_approved`` (the engine's promotion) runs
    with the review, still under the review's lock, so two last votes cannot promote twice."""
    user = audit.user()
    with locked(home, run_id):
        data = load(home, run_id)
        if data is None:
            raise ReviewError(
                f"run {run_id}: no review (only candidates waiting with [gate] promotion = "
                "\"review\" have one); see 'appliance review list'"
            )
        job = _job(home, data["job"])
        if data["state"] == APPROVED and job.state == AWAITING_REVIEW:  # a promotion interrupted after its last vote
            return _approved(home, data, on_approved)
        if data["state"] != PENDING or job.state != AWAITING_REVIEW:
            raise ReviewError(f"run {run_id}: the review is closed ({data['state']}, job {job.id} {job.state})")
        if any(v["user"] == user for v in data["votes"]):
            raise ReviewError(f"run {run_id}: {user} has already voted on this candidate; each reviewer votes once")
        if approve and registry.current(home) != data["current"]:
            raise ReviewError(
                f"run {run_id}: the current model changed from {data['current']} to "
                f"{registry.current(home)} since this review was built; its answers no longer "
                "compare with what is served, so reject it"
            )
        prefs = _preferences(preferences, len(data["items"]))
        data["approvals_needed"] = settings.gate.approvals  # as configured now: an admin may raise it
        data["votes"].append(
            {"user": user, "approve": bool(approve), "comment": comment, "preferences": prefs, "at": time.time()}
        )
        if not approve:
            data["state"] = REJECTED
        elif _approvals(data) >= data["approvals_needed"]:
            data["state"] = APPROVED
        write_json_atomic(home.run(run_id).review, data)  # the vote is durable before its audit line
        audit.append(
            home,
            "review_vote",
            job=data["job"],
            run=run_id,
            version=data["candidate"],
            approve=bool(approve),
            comment=comment,
            preferences={str(k): v for k, v in prefs.items()},
            approvals=_approvals(data),
            approvals_needed=data["approvals_needed"],
        )
        if data["state"] == REJECTED:
            return _finish_rejected(home, data, user, comment)
        if data["state"] == APPROVED:
            return _approved(home, data, on_approved)
        return outcome(home, data)


def approved_waiting(home: Home) -> list[Job]:
    """Jobs whose candidate the reviewers approved but which have not been promoted yet (the
    engine promotes them right after the deciding vote, or, if that was interrupted, later)."""
    if not home.jobs_db.exists():
        return []
    with Journal(home.jobs_db) as journal:
        jobs = journal.awaiting_review()
    return [
        job
        for job in jobs
        if (data := load(home.top.scoped(job.collection), job.run_id or "")) and data["state"] == APPROVED
    ]


def waiting_version(home: Home, version: str) -> str | None:
    """The run whose candidate ``version`` is, while it waits for review; else None."""
    if not home.jobs_db.exists():
        return None
    with Journal(home.jobs_db) as journal:
        jobs = journal.awaiting_review()
    return next((j.run_id for j in jobs if j.version == version), None)


def _approved(home: Home, data: dict[str, Any], on_approved: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    if on_approved is not None:
        on_approved(data)
    return outcome(home, data)


def _finish_rejected(home: Home, data: dict[str, Any], user: str, comment: str) -> dict[str, Any]:
    reason = f"rejected in review by {user}" + (f": {comment}" if comment else "")
    with Journal(home.jobs_db) as journal:
        journal.finish(data["job"], "refused", reason)
    audit.append(
        home, "job_refused", job=data["job"], run=data["run"], failed=["review"], reviewer=user, comment=comment
    )
    return outcome(home, data)


def outcome(home: Home, data: dict[str, Any]) -> dict[str, Any]:
    """What a reviewer sees after voting: the tally, the job's state and which answer was which."""
    job = _job(home, data["job"])
    return {
        "run": data["run"],
        "job": data["job"],
        "state": data["state"],
        "job_state": job.state,
        "approvals": _approvals(data),
        "approvals_needed": data["approvals_needed"],
        "current": registry.current(home),
        **_reveal(data),
    }


def _reveal(data: dict[str, Any]) -> dict[str, Any]:
    """Which answer was which, by version, for a reviewer who has voted."""
    names = {"candidate": data["candidate"], "current": data["current"] or "-"}
    return {
        "candidate": data["candidate"],
        "compared_with": data["current"],
        "reveal": [
            {
                "index": i["index"],
                "a": names[i["a"]],
                "b": names[_other(i["a"])],
                "a_is": i["a"],
                "b_is": _other(i["a"]),
            }
            for i in data["items"]
        ],
    }


def _other(side: str) -> str:
    return "current" if side == "candidate" else "candidate"


def _approvals(data: dict[str, Any]) -> int:
    return sum(1 for v in data["votes"] if v["approve"])


def _preferences(preferences: dict[int, str] | None, items: int) -> dict[int, str]:
    out: dict[int, str] = {}
    for key, value in (preferences or {}).items():
        index, side = int(key), str(value).strip().lower()
        if not 0 <= index < items:
            raise ReviewError(f"preference for item {index}: the review has items 0..{items - 1}")
        if side not in SIDES:
            raise ReviewError(f"preference for item {index}: {value!r} is not 'a' or 'b'")
        out[index] = side
    return out


def _job(home: Home, job_id: int) -> Job:
    with Journal(home.jobs_db) as journal:
        return journal.get(job_id)


@contextmanager
def locked(home: Home, run_id: str) -> Iterator[None]:
    """One vote (or the promotion it decides) at a time per candidate, across processes."""
    run = home.run(run_id)
    if not run.root.is_dir():
        raise ReviewError(f"run {run_id}: no such run ({run.root}); see 'appliance review list'")
    fd = os.open(run.review_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
