"""Ingest scaling ("Growth" in performance.md): one new file into a full inbox vs an empty one.

Two homes: one whose inbox already holds ``--files`` (10,000) ingested files, and
an empty one (fresh each round, warmed up with one file so that its database is
past its first write and its snapshots past the first, full one). Each round drops
one new chat file into each and times what the running appliance does with it,
A B, B A, ...; medians are compared. Single-file times sit around one or two
fsyncs, which on a shared disk come in two modes (about 4 and 8 ms here), hence
many rounds.

* ``ratio`` (the target): the watcher's path. The watcher reports the one stable
  path and :class:`appliance.data.ingest.Ingestor` (kept for the life of the daemon)
  ingests just that path: hash, parse, validate, one store transaction.
* ``snapshot_ratio``: cutting the next snapshot after that file (a delta manifest).
* ``full_scan_ratio``: for information, ``appliance ingest``, which by definition
  looks at every file in the inbox (listing and one stat each; nothing unchanged is
  read), so it grows with the inbox. The daemon runs it at start and every
  ``watch.rescan_seconds``, not per file.

No base model is imported in these homes, so records are not token-counted: the
measured work is the store's alone (with a tokenizer, both sides gain the same
per-file cost and the ratio would only look better).

    .venv/bin/python benchmarks/ingest_scaling.py [--files 10000] [--rounds 41] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import appliance  # noqa: F401  (offline environment first)
from appliance.cli.init import create_home
from appliance.data import snapshot
from appliance.data.ingest import Ingestor, ingest
from appliance.home.paths import Home


def chat_file(path: Path, tag: str, lines: int = 5) -> None:
    path.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"{tag}: question {i} about the clinic's policy on visiting hours"},
                        {
                            "role": "assistant",
                            "content": f"{tag}: answer {i}, visiting hours are two to four on weekdays",
                        },
                    ]
                }
            )
            + "\n"
            for i in range(lines)
        )
    )


def full_home(root: Path, files: int) -> Home:
    home = create_home(root, "none")
    # All in the inbox itself: an inbox sub-folder is a collection with its own store,
    # and the new files below land in the shared one, which must be the full store.
    for i in range(files):
        chat_file(home.inbox / f"existing-{i:05}.jsonl", f"existing {i}")
    started = time.monotonic()
    report = ingest(home)
    assert report.files == files, report.to_dict()
    print(
        f"setup: ingested {files} files ({report.accepted} records) in {time.monotonic() - started:.0f} s", flush=True
    )
    snapshot.cut_id(home, 0.1)
    return home


def empty_home(root: Path, ingestor_for: Callable[[Home], Ingestor]) -> tuple[Home, Ingestor]:
    """A fresh home warmed up with one file: its store has been written to and a snapshot
    cut, as in any running appliance (a database's first write and a first, full snapshot
    cost more than the steady state, which would flatter the full side)."""
    home = create_home(root, "none")
    ingestor = ingestor_for(home)
    chat_file(home.inbox / "warm-up.jsonl", "warm-up")
    ingestor.run([home.inbox / "warm-up.jsonl"])
    snapshot.cut_id(home, 0.1)
    return home, ingestor


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def one_round(home: Home, ingestor: Ingestor, tag: str) -> dict[str, float]:
    path = home.inbox / f"new-{tag}.jsonl"
    chat_file(path, f"new {tag}")
    out = {"watch": timed(lambda: ingestor.run([path]))}
    out["snapshot"] = timed(lambda: snapshot.cut_id(home, 0.1))
    chat_file(home.inbox / f"scan-{tag}.jsonl", f"scan {tag}")
    out["full_scan"] = timed(lambda: ingest(home))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--smoke", action="store_true", help="the same code path at a tiny size (20 files, 3 rounds)")
    args = parser.parse_args()
    if args.smoke:
        args.files, args.rounds = 20, 3
    with tempfile.TemporaryDirectory(prefix="ingest-scaling-") as tmp:
        big = full_home(Path(tmp) / "full", args.files)
        big_ingestor = Ingestor(big)
        samples: dict[str, dict[str, list[float]]] = {"full": {}, "empty": {}}
        for r in range(args.rounds):
            small, small_ingestor = empty_home(Path(tmp) / f"empty{r}", Ingestor)
            sides = [("full", big, big_ingestor), ("empty", small, small_ingestor)]
            for side, home, ingestor in sides if r % 2 else sides[::-1]:  # A B, B A: no side always first
                for key, seconds in one_round(home, ingestor, f"{r}").items():
                    samples[side].setdefault(key, []).append(seconds)
            small_ingestor.close()
        big_ingestor.close()
    med = {side: {k: statistics.median(v) for k, v in per.items()} for side, per in samples.items()}
    for key in ("watch", "snapshot", "full_scan"):
        print(
            f"{key:10} median over {args.rounds}: {args.files} files {med['full'][key] * 1000:7.1f} ms, "
            f"empty {med['empty'][key] * 1000:7.1f} ms"
        )
    ratio = med["full"]["watch"] / med["empty"]["watch"]
    print(
        json.dumps(
            {
                "name": "ingest_scaling",
                "ratio": round(ratio, 3),
                "target": 1.5,
                "pass": ratio <= 1.5,
                "files": args.files,
                "rounds": args.rounds,
                "ms": {side: {k: round(v * 1000, 2) for k, v in per.items()} for side, per in med.items()},
                "snapshot_ratio": round(med["full"]["snapshot"] / med["empty"]["snapshot"], 3),
                "full_scan_ratio": round(med["full"]["full_scan"] / med["empty"]["full_scan"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
