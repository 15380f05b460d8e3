"""Passage index growth: adding one document to an index of 10,000 passages vs an empty one.

Two indexes: one filled with ``--passages`` (10,000) passages of synthetic prose (words drawn
from a Zipf-like vocabulary, so the term dictionary and posting lists look like text's), and
an empty one, fresh each round and warmed up with one document (a database's first write
costs more than the steady state and would flatter the full side). Each round adds one new
document of ten passages to each, A B, B A, ..., and the medians are compared.

* ``ratio`` (the target): :meth:`appliance.data.index.Index.add_document`, one transaction:
  the rows, FTS5's incremental segment writes (and its automerge), one fsync.
* ``remove_ratio``: for information, removing that document again (what forget does).
* ``search``: for information, a five-word question against each side (this one grows
  with the posting lists, by nature).

    .venv/bin/python benchmarks/index_update.py [--passages 10000] [--rounds 41] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import appliance  # noqa: F401  (offline environment first)
from appliance.data.index import Index

SYLLABLES = "ka lo mi ne ru sa te vo zi ba de fo gu hi ja".split()
PASSAGES_PER_DOCUMENT = 10


def vocabulary(rng: random.Random, size: int = 5_000) -> tuple[list[str], list[float]]:
    words = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(size * 2)})[:size]
    rng.shuffle(words)
    return words, [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf: a few words everywhere


def document(rng: random.Random, vocab: tuple[list[str], list[float]]) -> list[str]:
    words, weights = vocab
    return [" ".join(rng.choices(words, weights, k=60)) + "." for _ in range(PASSAGES_PER_DOCUMENT)]


def full_index(path: Path, passages: int, rng: random.Random, vocab: tuple[list[str], list[float]]) -> Index:
    started = time.monotonic()
    index = Index(path, create=True)
    for d in range(passages // PASSAGES_PER_DOCUMENT):  # one transaction each, as ingest adds them
        index.add_document(f"existing-{d:06}", f"batch/{d:06}.md", document(rng, vocab))
    print(f"setup: {index.count()} in {time.monotonic() - started:.0f} s", flush=True)
    return index


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def one_round(index: Index, sha: str, passages: list[str], question: str) -> dict[str, float]:
    return {
        "add": timed(lambda: index.add_document(sha, f"new/{sha}.md", passages)),
        "search": timed(lambda: index.search(question)),
        "remove": timed(lambda: index.remove_document(sha)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--smoke", action="store_true", help="1,000 passages, 7 rounds: a quick check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.passages, args.rounds = 1_000, 7
    rng = random.Random(20261206)
    vocab = vocabulary(rng)
    samples: dict[str, dict[str, list[float]]] = {"full": {}, "empty": {}}
    with tempfile.TemporaryDirectory(prefix="index-update-") as tmp:
        big = full_index(Path(tmp) / "full.db", args.passages, rng, vocab)
        for r in range(args.rounds):
            small = Index(Path(tmp) / f"empty{r}.db", create=True)
            small.add_document("warm-up", "warm-up.md", document(rng, vocab))
            passages, question = document(rng, vocab), " ".join(rng.choices(vocab[0][:500], k=5))
            sides = [("full", big), ("empty", small)]
            for side, index in sides if r % 2 else sides[::-1]:  # A B, B A: no side always first
                for key, seconds in one_round(index, f"new-{r}", passages, question).items():
                    samples[side].setdefault(key, []).append(seconds)
            small.close()
        big.close()
    med = {side: {k: statistics.median(v) for k, v in per.items()} for side, per in samples.items()}
    for key in ("add", "remove", "search"):
        print(
            f"{key:7} median over {args.rounds}: {args.passages} passages {med['full'][key] * 1000:7.2f} ms, "
            f"empty {med['empty'][key] * 1000:7.2f} ms"
        )
    ratio = med["full"]["add"] / med["empty"]["add"]
    print(
        json.dumps(
            {
                "name": "index_update",
                "ratio": round(ratio, 3),
                "target": 1.5,
                "pass": ratio <= 1.5,
                "passages": args.passages,
                "rounds": args.rounds,
                "remove_ratio": round(med["full"]["remove"] / med["empty"]["remove"], 3),
                "ms": {side: {k: round(v * 1000, 2) for k, v in per.items()} for side, per in med.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
