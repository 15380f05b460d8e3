"""Grounded recall: does the endpoint answer the team's handbook from its passages, cite the
right one, and say so when the handbook does not cover a question? And what does retrieval
cost in time to first token?

In a fresh home on the embedded default (defaults of ``appliance init``, nothing tuned):

1. ``handbook.md`` is dropped into the inbox and ingested (the passage index is built);
   retrieval alone is scored, BM25 vs BM25 fused with the shipped word vectors (recall@k);
   the base model is asked every probe (``probes.jsonl``: paraphrases) and every
   unanswerable question (``unanswerable.jsonl``) through the real endpoint, grounded;
2. one unattended ``appliance run --once --no-serve`` cycle trains on the handbook (study
   material and RAFT conversations) and promotes; the same questions are asked again, and
   once more with ``grounding: false`` (closed book) for comparison;
3. time to first token, streamed, with and without grounding, side by side at 1 and 4
   concurrent clients.

Open-book recall: the probe's expected phrase in the answer. Citation accuracy: of the
answers that cite a passage ``[n]``, the share whose first cited passage holds the expected
phrase. "Says so": the unanswerable questions answered with "the documents do not say".
Targets (issue "Grounded answers with sources"): open-book recall >= 90%, citation
accuracy >= 90%, says-so >= 80% (the trained model), TTFT grounded/plain <= 1.3 at 4
clients. The last line is one JSON object.

    .venv/bin/python benchmarks/grounded_recall.py [--smoke] [--no-train]

``--smoke``: the tests' tiny random model, a slice of the handbook, a few training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import appliance  # noqa: F401  (offline environment first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knowledge_recall import HANDBOOK, drop, free_port, one_cycle  # noqa: E402
from smoke import smoke_base  # noqa: E402

from appliance.cli.init import init  # noqa: E402
from appliance.data import wordvectors  # noqa: E402
from appliance.data.grounded import says_not_covered  # noqa: E402
from appliance.data.index import Index, retrieve  # noqa: E402
from appliance.data.ingest import ingest  # noqa: E402
from appliance.home import registry  # noqa: E402
from appliance.home.config import load  # noqa: E402
from appliance.home.paths import Home  # noqa: E402
from appliance.quality import probes  # noqa: E402
from appliance.serving.guard import read_api_key  # noqa: E402
from appliance.serving.server import Server  # noqa: E402

TARGETS = {"open_book_recall": 0.9, "citation_accuracy": 0.9, "says_so": 0.8, "ttft_ratio_4_clients": 1.3}
ANSWER_TOKENS = 64
TTFT_ROUNDS = 3  # questions each client asks per setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny random model, a slice of the handbook")
    parser.add_argument("--no-train", action="store_true", help="the base model with retrieval only (no cycle)")
    parser.add_argument(
        "--home",
        help="score a home that has already run its cycle on handbook.md (e.g. one knowledge_recall.py --keep "
        "left): its current model and the base, no new training",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grounded-recall-", dir=os.environ.get("BENCH_TMP")))
    try:
        result = run(work, args.smoke, train=not args.no_train, existing=Path(args.home) if args.home else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def run(work: Path, smoke: bool, train: bool, existing: Path | None = None) -> dict[str, Any]:
    questions = probes.load(HANDBOOK / "probes.jsonl")
    unanswerable = [json.loads(line)["question"] for line in (HANDBOOK / "unanswerable.jsonl").read_text().splitlines()]
    if smoke:
        questions, unanswerable = questions[:6], unanswerable[:3]
    home = Home(existing) if existing else Home(work / "home")
    if existing is None:
        init(home.root, str(smoke_base(work)) if smoke else "embedded")
        drop(home, "md", smoke)
        ingest(home)
    found = retrieval(home, questions)
    print(f"retrieval recall@k: {found}", flush=True)
    scores: dict[str, Any] = {}
    if existing is None:  # the base is the current model until the cycle (a pinned id is never grounded)
        scores["base"] = score(home, "base", questions, unanswerable)
        print(f"base, grounded: {scores['base']}", flush=True)
    cycle = None
    if existing is not None and registry.current(home) not in (None, "base"):
        version = registry.current(home)
        scores["trained"] = score(home, version, questions, unanswerable)
        scores["trained"]["closed_book_recall"] = score(home, version, questions, [], grounding=False)["recall"]
        print(f"{version}, grounded: {scores['trained']}", flush=True)
    elif train:
        cycle = one_cycle(home, smoke)
        version = registry.current(home)
        scores["trained"] = score(home, version, questions, unanswerable)
        scores["trained"]["closed_book_recall"] = score(home, version, questions, [], grounding=False)["recall"]
        print(f"{version}, grounded: {scores['trained']}", flush=True)
    ttft = time_to_first_token(home, questions)
    print(f"time to first token: {ttft}", flush=True)
    if not scores:
        sys.exit(f"{home.root}: no trained current model to score (its cycle was refused by the gate?)")
    final = scores.get("trained") or scores["base"]
    checks = [
        final["recall"] >= TARGETS["open_book_recall"],
        (final["citation_accuracy"] or 0) >= TARGETS["citation_accuracy"],
        final["says_so"] >= TARGETS["says_so"],
        ttft["ratio_4_clients"] <= TARGETS["ttft_ratio_4_clients"],
    ]
    return {
        "name": "grounded_recall",
        "probes": len(questions),
        "unanswerable": len(unanswerable),
        "scores": scores,
        "retrieval_recall_at_k": found,
        "open_book_recall": final["recall"],
        "citation_accuracy": final["citation_accuracy"],
        "says_so": final["says_so"],
        "ttft": ttft,
        "ttft_ratio_4_clients": ttft["ratio_4_clients"],
        "cycle_minutes": round(cycle / 60, 2) if cycle else None,
        "targets": TARGETS,
        "smoke": smoke,
        "pass": all(checks),
    }


def retrieval(home: Home, questions: list[probes.Probe]) -> dict[str, Any]:
    """Model-free: the share of probes whose answering passage is among the ``[grounding]
    passages`` retrieved, by BM25 alone and fused with the shipped word vectors, side by side.
    The passages' vectors are made here first, so the endpoint uses them from its first question."""
    k = load(home.config).grounding.passages
    with Index(home.passage_index) as index:
        wordvectors.embed_index(index)

        def share(dense: Any) -> float:
            return _share([any(q.hit(h.text) for h in retrieve(index, q.question, k, dense)[0]) for q in questions])

        return {"k": k, "bm25": share(None), "bm25+word_vectors": share(wordvectors.nearest)}


def score(
    home: Home, model: str | None, questions: list[probes.Probe], unanswerable: list[str], grounding: bool = True
) -> dict[str, Any]:
    """Recall, citation accuracy and the says-so rate of the ``appliance`` id (the current model)."""
    with served(home) as (url, key), probes.endpoint_client(url, key) as client:
        answers = [chat(client, q.question, grounding) for q in questions]
        declined = [chat(client, q, grounding) for q in unanswerable]
    right = [q.hit(a["answer"]) for q, a in zip(questions, answers)]
    citing = []
    for q, a in zip(questions, answers):
        first = next((s for s in a["cited"]), None)
        if first is not None:
            citing.append(q.hit(first["passage"]))
    retrieved = [any(q.hit(s["passage"]) for s in a["sources"]) for q, a in zip(questions, answers)]
    return {
        "model": model,
        "recall": _share(right),
        "citation_accuracy": _share(citing) if citing else None,
        "citing": len(citing),
        "retrieval_recall_at_k": _share(retrieved),  # the answer's passage was among those given
        "says_so": _share([says_not_covered(a["answer"]) for a in declined]) if declined else 0.0,
    }


def chat(client: Any, question: str, grounding: bool) -> dict[str, Any]:
    import re

    body: dict[str, Any] = {
        "model": "appliance",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0.0,
        "max_tokens": ANSWER_TOKENS,
        "seed": 0,
    }
    if not grounding:
        body["grounding"] = False
    reply = client.post("/v1/chat/completions", json=body)
    reply.raise_for_status()
    payload = reply.json()
    answer = payload["choices"][0]["message"]["content"] or ""
    sources = payload.get("sources", [])
    by_id = {s["id"]: s for s in sources}
    cited = [by_id[int(n)] for n in re.findall(r"\[(\d{1,2})\]", answer) if int(n) in by_id]
    return {"answer": answer, "sources": sources, "cited": cited}


class served:
    """The home's endpoint, started for a measurement and stopped after it."""

    def __init__(self, home: Home):
        self.home = home

    def __enter__(self) -> tuple[str, str]:
        self.server = Server(self.home, load(self.home.config), host="127.0.0.1", port=free_port()).start()
        return self.server.url, read_api_key(self.home)

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


def time_to_first_token(home: Home, questions: list[probes.Probe]) -> dict[str, Any]:
    """Median seconds to the first streamed content, grounded vs plain, at 1 and 4 clients
    (settings interleaved round by round, so a slow moment hits both)."""
    out: dict[str, Any] = {}
    with served(home) as (url, key):
        with probes.endpoint_client(url, key) as warm:
            chat(warm, questions[0].question, True)  # the model is loaded before anything is timed
        for clients in (1, 4):
            times: dict[bool, list[float]] = {True: [], False: []}
            for round_ in range(TTFT_ROUNDS):
                for grounding in (True, False):
                    times[grounding] += concurrent_ttft(url, key, questions, clients, grounding, round_)
            grounded, plain = statistics.median(times[True]), statistics.median(times[False])
            out[f"{clients}_clients"] = {"grounded_s": round(grounded, 4), "plain_s": round(plain, 4)}
            out[f"ratio_{clients}_client" + ("s" if clients > 1 else "")] = round(grounded / plain, 3)
    return out


def concurrent_ttft(
    url: str, key: str, questions: list[probes.Probe], clients: int, grounding: bool, round_: int
) -> list[float]:
    results: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        question = questions[(round_ * clients + i) % len(questions)].question
        body: dict[str, Any] = {
            "model": "appliance",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 8,
            "temperature": 0.0,
            "stream": True,
        }
        if not grounding:
            body["grounding"] = False
        with probes.endpoint_client(url, key) as client:
            started = time.perf_counter()
            with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: {") and first_content(line[6:]):
                        with lock:
                            results.append(time.perf_counter() - started)
                        break  # leaving the block closes the stream: the server cancels the rest

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def first_content(data: str) -> bool:
    try:
        chunk = json.loads(data)
    except ValueError:
        return False
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or [])


def _share(hits: list[bool]) -> float:
    return round(sum(hits) / len(hits), 4) if hits else 0.0


if __name__ == "__main__":
    main()
