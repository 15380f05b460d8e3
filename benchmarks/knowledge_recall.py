"""Knowledge recall: does one unattended cycle of ``appliance run`` teach the served model a
handbook's facts? Closed-book, on paraphrased probe questions, with a fresh home's defaults.

For each form of the team's fictional handbook (``examples/handbook/``: the same facts as
``handbook.md``, ``handbook.docx``, ``handbook.pdf``, and as chat Q&A ``qa.jsonl`` with three
questions per fact), in a fresh home on the embedded default model:

1. the file is dropped into the inbox and ``appliance run --once --no-serve`` runs one
   unattended cycle (ingest, snapshot, study, train, export, gate, promote) — timed;
2. the probe questions (``probes.jsonl``: paraphrases, none word for word in the handbook)
   are asked greedily of the promoted version through the real endpoint (the served,
   quantized file), and of the base; an answer is right when it holds an expected phrase;
3. the same questions are asked of the run's f16 GGUF (merged and converted again from the
   kept adapter) and of the HF model (base + adapter, transformers' greedy generate), so
   a loss from quantization or conversion shows;
4. when the gate refused the candidate, the questions are asked of the quantized file it
   would have served (``candidate``), so "learned but refused" and "did not learn" differ.

Targets (issue "Knowledge that sticks"): documents >= 50% of probes, Q&A >= 60%, base <=
10%, the handbook cycle under 20 minutes on these 2 cores. The last line is one JSON object.

    .venv/bin/python benchmarks/knowledge_recall.py [--forms md,docx,pdf,qa] [--smoke]

``--smoke``: the tests' tiny random model, the first facts of the handbook and a few training
steps: the same code path in a minute or two (the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import appliance  # noqa: F401  (offline environment first)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke import smoke_base  # noqa: E402

from appliance.cli.init import init  # noqa: E402
from appliance.home import registry  # noqa: E402
from appliance.home.config import dump, load  # noqa: E402
from appliance.home.paths import Home  # noqa: E402
from appliance.quality import probes  # noqa: E402
from appliance.serving.guard import read_api_key  # noqa: E402
from appliance.serving.server import Server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HANDBOOK = REPO / "examples" / "handbook"
FORMS = {"md": "handbook.md", "docx": "handbook.docx", "pdf": "handbook.pdf", "qa": "qa.jsonl"}
TARGETS = {"documents": 0.5, "qa": 0.6, "base_max": 0.1, "cycle_minutes": 20.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--forms", default=None, help="comma-separated: md, docx, pdf, qa (default all; md and qa with --smoke)"
    )
    parser.add_argument("--smoke", action="store_true", help="the tiny random model, a slice of the handbook")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF and f16 recall (served and base only)")
    parser.add_argument("--keep", action="store_true", help="keep the homes (printed) for a look afterwards")
    args = parser.parse_args()
    default = "md,qa" if args.smoke else "md,docx,pdf,qa"
    forms = [f.strip() for f in (args.forms or default).split(",") if f.strip()]
    if unknown := set(forms) - set(FORMS):
        parser.error(f"unknown form(s): {', '.join(sorted(unknown))}")
    work = Path(tempfile.mkdtemp(prefix="knowledge-recall-", dir=os.environ.get("BENCH_TMP")))
    try:
        result = run(work, forms, args.smoke, with_hf=not args.no_hf)
    finally:
        if args.keep:
            print(f"homes kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def run(work: Path, forms: list[str], smoke: bool, with_hf: bool) -> dict[str, Any]:
    questions = probes.load(HANDBOOK / "probes.jsonl")
    base_source = str(smoke_base(work)) if smoke else "embedded"
    template = work / "template"
    init(template, base_source)  # the base's export is shared: each form copies this home
    if smoke:
        questions = questions[:6]
    recall: dict[str, dict[str, Any]] = {}
    cycle: dict[str, float] = {}
    base_recall = None
    for form in forms:
        home = Home(work / form)
        shutil.copytree(template, home.root, symlinks=True)
        drop(home, form, smoke)
        cycle[form] = one_cycle(home, smoke)
        version = registry.current(home)
        served, base = ask_served(home, questions, version)
        base_recall = base_recall if base_recall is not None else base
        recall[form] = {"served": served, "version": version, "gate": gate_summary(home)}
        if with_hf and version not in (None, "base"):
            recall[form].update(other_forms(home, version, questions))
        if recall[form]["gate"].get("passed") is False:
            recall[form]["candidate"] = refused_candidate(home, questions)
        refused = f", refused candidate {recall[form]['candidate']}" if "candidate" in recall[form] else ""
        print(
            f"{form}: served {served:.2f} ({version}), base {base:.2f}{refused}, cycle {cycle[form] / 60:.1f} min",
            flush=True,
        )
    return summary(recall, base_recall or 0.0, cycle, len(questions), smoke)


def drop(home: Home, form: str, smoke: bool) -> None:
    """The handbook in one form into the inbox (a slice of it for the smoke size)."""
    source = HANDBOOK / FORMS[form]
    target = home.inbox / source.name
    if smoke and form == "md":
        target.write_text("\n\n".join(source.read_text().split("\n\n")[:4]) + "\n")
    elif smoke and form == "qa":
        target.write_text("".join(source.read_text().splitlines(keepends=True)[:18]))
    else:
        shutil.copy(source, target)
    if smoke:  # a few steps: the code path, not the learning
        settings = load(home.config)
        settings.train.max_steps = 4
        home.config.write_text(dump(settings))


def training_runs(home: Home) -> list[Path]:
    """The home's run folders, oldest first (runs/base holds the base's export, no training)."""
    return sorted(p for p in home.runs.iterdir() if p.is_dir() and p.name != "base") if home.runs.exists() else []


def gate_summary(home: Home) -> dict[str, Any]:
    """The cycle's gate: its decision, failed checks, and recall (closed and open book)."""
    evals = [p / "eval.json" for p in training_runs(home) if (p / "eval.json").exists()]
    if not evals:
        return {}
    report = json.loads(evals[-1].read_text())
    failed = [f"{c['name']}: {c.get('detail', '')}" for c in report.get("checks", []) if c.get("passed") is False]
    recall = report.get("recall") or {}
    return {
        "passed": report.get("passed"),
        "failed": failed,
        "heldout_recall": recall.get("candidate"),
        "open_book": (recall.get("open_book") or {}).get("candidate"),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_cycle(home: Home, smoke: bool) -> float:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--once", "--no-serve", "--home", str(home.root)],
        capture_output=True,
        text=True,
        timeout=3600 * 2,
    )
    if proc.returncode != 0:
        sys.exit(f"appliance run failed for {home.root.name}:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def ask_served(home: Home, questions: list[probes.Probe], version: str | None) -> tuple[float, float]:
    """Recall of the promoted version and of the base, through the real endpoint."""
    server = Server(home, load(home.config), port=free_port()).start()
    try:
        with probes.endpoint_client(server.url, read_api_key(home)) as client:

            def score(model: str) -> float:
                return sum(q.hit(probes.ask(client, model, q.question)) for q in questions) / len(questions)

            base = score("base")
            return (score(version) if version and version != "base" else base), base
    finally:
        server.stop()


def other_forms(home: Home, version: str, questions: list[probes.Probe]) -> dict[str, float]:
    """Recall of the HF model (base + the run's adapter) and of its f16 GGUF."""
    from appliance.export.convert import convert
    from appliance.runtime.hf import load_tokenizer
    from appliance.training.merge import merge

    settings = load(home.config)
    run = home.run(registry.get(home, version)["run"])
    merged = run.root / "bench-merged"
    merge(home.base(settings.base.name), run.adapter, merged)
    gguf = convert(merged, run.root / "bench-f16.gguf")
    tokenizer = load_tokenizer(merged)
    f16 = gguf_recall(gguf, tokenizer, questions)
    return {"f16": f16, "hf": hf_recall(merged, tokenizer, chat_prompts(tokenizer, questions), questions)}


def refused_candidate(home: Home, questions: list[probes.Probe]) -> float | None:
    """Recall of the quantized file a refused candidate would have served (None if none was made)."""
    from appliance.runtime.hf import load_tokenizer

    runs = training_runs(home)
    quants = sorted((runs[-1] / "gguf").glob("model-Q*.gguf")) if runs else []
    if not quants:
        return None
    tokenizer = load_tokenizer(home.base(load(home.config).base.name))
    return gguf_recall(quants[0], tokenizer, questions)


def chat_prompts(tokenizer: Any, questions: list[probes.Probe]) -> list[list[int]]:
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q.question}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def gguf_recall(gguf: Path, tokenizer: Any, questions: list[probes.Probe]) -> float:
    """The questions asked of a GGUF file through llama.cpp (greedy, 48 tokens, no endpoint)."""
    from appliance.runtime.llamacpp_child import run as llama_run

    result = llama_run(gguf, generate=[(ids, 48) for ids in chat_prompts(tokenizer, questions)], timeout=1800)
    hits = [q.hit(tokenizer.decode(ids, skip_special_tokens=True)) for q, ids in zip(questions, result.generated)]
    return sum(hits) / len(questions)


def hf_recall(model_dir: Path, tokenizer: Any, prompts: list[list[int]], questions: list[probes.Probe]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, local_files_only=True)
    hits = 0
    with torch.no_grad():
        for ids, q in zip(prompts, questions):
            out = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)
            hits += q.hit(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    return hits / len(questions)


def summary(recall: dict[str, Any], base: float, cycle: dict[str, float], n: int, smoke: bool) -> dict[str, Any]:
    docs = [recall[f]["served"] for f in ("md", "docx", "pdf") if f in recall]
    checks = [base <= TARGETS["base_max"]]
    checks += [r >= TARGETS["documents"] for r in docs]
    if "qa" in recall:
        checks.append(recall["qa"]["served"] >= TARGETS["qa"])
    checks += [cycle[f] / 60 <= TARGETS["cycle_minutes"] for f in cycle if f != "qa"]
    return {
        "name": "knowledge_recall",
        "probes": n,
        "recall": recall,
        "base_recall": base,
        "documents_recall": min(docs) if docs else None,
        "cycle_minutes": {f: round(s / 60, 2) for f, s in cycle.items()},
        "targets": TARGETS,
        "smoke": smoke,
        "pass": all(checks),
    }


if __name__ == "__main__":
    main()
