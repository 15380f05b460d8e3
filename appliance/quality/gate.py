"""Stage 8, the promotion gate: a candidate replaces the current model only if it is not worse.

Four checks, each with its number, threshold and a verdict in plain words, written
to ``runs/<id>/eval.json``:

1. ``parity``: the export's ``parity.json`` passed.
2. ``validation_loss``: on the candidate snapshot's validation split, the
   per-token loss of the candidate and of the current model, both computed by
   llama.cpp on the quantized files that would be served (in a child process). The
   paired per-example differences (candidate minus current) get a bootstrap
   interval; the candidate fails if even the interval's low end exceeds
   ``gate.loss_margin`` (it is worse beyond noise). ``new_data``: on validation
   examples the current model never saw (not in its snapshot), a training run must
   have the lower mean loss. A forget run only has to not regress.
3. ``general_probes`` / ``general_perplexity``: the general-skills questions the
   team ships (an expected phrase in a greedy answer) and the perplexity on a
   general text may not fall / rise beyond ``gate.general_max_drop`` /
   ``gate.general_max_ppl_ratio``.
4. ``user_probes``: questions in the home's ``probes/`` (``*.jsonl``) may not be
   answered correctly less often (``gate.user_max_drop``).
5. ``recall_kept`` / ``recall_gain``: closed-book recall of the study questions held out
   of training (appliance/quality/recall.py), asked in the same llama.cpp child; some of
   them also open-book, with the passages the endpoint would retrieve (reported in
   ``eval.json``'s ``recall.open_book``: recall and citation accuracy, no pass or fail).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from appliance.contract.errors import ApplianceError, DataError
from appliance.contract.events import Emit, StageFinished, StageStarted, ignore
from appliance.data.snapshot import load, records
from appliance.home import registry
from appliance.home.catalog import adapter_mode, base_model, served
from appliance.home.config import Settings
from appliance.home.fsutil import read_json, sha256_file, write_json_atomic
from appliance.home.paths import Home
from appliance.quality import recall
from appliance.quality.metrics import answer_metrics, perplexity
from appliance.quality.probes import load as load_probes
from appliance.runtime import llamacpp_child
from appliance.training.render import RenderError, last_answer, render

STAGE = "gate"
TEXT_CHUNK = 256


class GateError(ApplianceError):
    title = "Promotion gate"


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not applicable here (said why in ``detail``)
    value: Any = None
    threshold: Any = None
    detail: str = ""


@dataclass
class Report:
    run: str
    kind: str
    candidate: dict[str, Any]
    current: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0
    # Metrics people recognise, side by side (information, not checks): see _metrics.
    metrics: dict[str, Any] = field(default_factory=dict)
    # Closed-book recall of the held-out study questions, overall and per document (quality/recall.py).
    recall: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    def verdict(self) -> str:
        if self.passed:
            return f"promote: run {self.run} passed every check against {self.current.get('version') or 'nothing'}"
        reasons = "; ".join(f"{c.name}: {c.detail}" for c in self.failed)
        return f"keep the current model {self.current.get('version') or '-'}: {reasons}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "kind": self.kind,
            "passed": self.passed,
            "verdict": self.verdict(),
            "failed": [c.name for c in self.failed],
            "candidate": self.candidate,
            "current": self.current,
            "checks": [asdict(c) for c in self.checks],
            "metrics": self.metrics,
            "recall": self.recall,
            "seconds": self.seconds,
            "at": time.time(),
        }


# --- the gate ----------------------------------------------------------------------------------


def candidate_gguf(home: Home, run_id: str) -> Path | None:
    """The quantized file the export chose for this run (kept after intermediates are cleaned)."""
    run = home.run(run_id)
    if not run.parity.exists():
        return None
    path = run.gguf / read_json(run.parity)["gguf"]
    if path.exists():
        return path
    for record in registry.versions(home):  # registered already: the same bytes under models/
        if record.get("run") == run_id:
            return registry.gguf_path(home, record["version"])
    return None


def evaluate(
    home: Home, run_id: str, settings: Settings, kind: str = "train", emit: Emit = ignore, against: str | None = None
) -> Report:
    """Judge run ``run_id`` against the current version (or ``against``); write eval.json."""
    started = time.monotonic()
    emit(StageStarted(STAGE, description=f"Comparing run {run_id} with the current model"))
    run = home.run(run_id)
    if not run.root.is_dir():
        raise GateError(f"{run.root}: no such run")
    cand, current_version, cur = models(home, run_id, settings, against)
    cand_path = cand[0] if cand else None
    report = Report(
        run_id,
        kind,
        _describe((cand[1] or cand[0]) if cand else None, run_id),
        {
            "version": current_version,
            "path": str(cur[0]) if cur else None,
            **({"adapter": str(cur[1])} if cur and cur[1] else {}),
        },
    )
    report.checks.append(_parity_check(run.parity, cand_path))
    if report.checks[0].passed and cand is not None and cur is not None and cur[0].exists():
        _model_checks(home, report, run_id, cand, cur, current_version, settings, kind)
    elif report.checks[0].passed:
        report.checks.append(Check("validation_loss", None, detail="no current model to compare with"))
    report.seconds = time.monotonic() - started
    write_json_atomic(run.eval, report.to_dict())
    emit(StageFinished(STAGE, summary=report.verdict(), seconds=report.seconds))
    return report


Model = tuple[Path, "Path | None"]  # a GGUF file and the LoRA adapter applied to it (or None)


def models(
    home: Home, run_id: str, settings: Settings, against: str | None = None
) -> tuple[Model | None, str | None, Model | None]:
    """(candidate, current version, current model) as llama.cpp will serve them.

    In a collection served as adapters, the candidate is the base model with the run's
    adapter, and the current model is the base with the collection's current adapter,
    or the bare base before the collection has one: a collection's first model must be
    better than the base on its own data.
    """
    cand_file = candidate_gguf(home, run_id)
    cand: Model | None = (cand_file, None) if cand_file else None
    if adapter_mode(home, settings):
        run = home.run(run_id)
        adapter = read_json(run.parity).get("adapter") if run.parity.exists() else None
        cand = (base_model(home)[1], run.gguf / adapter) if adapter and (run.gguf / adapter).exists() else None
    version = against or registry.current(home)
    if version is not None:
        now = served(home, home.collection, version)
        return cand, version, (now.gguf, now.adapter) if now else None
    if home.collection:
        base_version, base_file = base_model(home)
        return cand, base_version, (base_file, None)
    return cand, None, None


def _describe(path: Path | None, run_id: str) -> dict[str, Any]:
    return {
        "run": run_id,
        "path": str(path) if path else None,
        "sha256": sha256_file(path) if path and path.exists() else None,
    }


def _parity_check(parity: Path, gguf: Path | None) -> Check:
    if not parity.exists():
        return Check("parity", False, detail="the run has not been exported (no parity.json)")
    data = read_json(parity)
    if not data.get("passed"):
        failures = [f"{c['name']}" for c in data.get("checks", []) if not c.get("passed")]
        return Check(
            "parity",
            False,
            False,
            True,
            f"the exported file does not match the trained model ({', '.join(failures) or 'see parity.json'})",
        )
    if gguf is None:
        return Check("parity", False, True, True, "the quantized file the export chose is missing")
    return Check("parity", True, True, True, f"{data.get('gguf')} ({data.get('quant')}) matches the trained model")


def _model_checks(
    home: Home,
    report: Report,
    run_id: str,
    cand: Model,
    cur: Model,
    cur_version: str | None,
    settings: Settings,
    kind: str,
) -> None:
    from appliance.runtime.hf import load_tokenizer  # transformers: only a gate that runs loads it

    tokenizer = load_tokenizer(home.base(settings.base.name))
    examples, new_mask, questions = _validation(home, run_id, cur_version, tokenizer, settings)
    general = _general_probes()
    user = user_probes(home)
    text = _text_sequences(tokenizer)
    held = recall.heldout(home, run_id)
    asked = recall.sample(held, settings.gate.recall_questions)
    probes = [p.question for p in general + user]
    opened, open_chats = recall.open_book_chats(asked, settings.gate.open_book_questions)
    chats = [[{"role": "user", "content": q}] for q in probes + [a.question for a in asked]] + open_chats
    prompts = _prompt_ids(cand[0], chats, settings)
    prompts, recall_prompts = prompts[: len(probes)], prompts[len(probes) :]
    sample = _answer_sample(examples, questions)
    extra = [q.prompt for q in sample] + recall_prompts  # one child per model asks everything
    cand_out = _ask(cand, examples, text, prompts + extra, settings)
    cur_out = _ask(cur, examples, text, prompts + extra, settings)
    report.metrics = _metrics(tokenizer, sample, cand_out, cur_out, len(prompts))
    at = len(prompts) + len(sample)
    said = [
        [tokenizer.decode(ids, skip_special_tokens=True) for ids in out["answers"][at:]] for out in (cand_out, cur_out)
    ]
    hits = [[a.hit(text) for a, text in zip(asked, answers[: len(asked)])] for answers in said]
    report.recall = recall.summary(held, asked, hits[0], hits[1])
    if opened:
        report.recall["open_book"] = recall.open_book_summary(opened, said[0][len(asked) :], said[1][len(asked) :])
    new_docs = set(held) - recall.documents_of(home, cur_version)
    report.checks += [Check(**c) for c in recall.checks(asked, hits[0], hits[1], new_docs, settings, kind)]
    report.checks += _loss_checks(cand_out["val"], cur_out["val"], new_mask, settings, kind)
    n = len(general)
    report.checks += _general_checks(tokenizer, general, cand_out, cur_out, n, settings)
    report.checks.append(_user_check(tokenizer, user, cand_out["answers"][n:], cur_out["answers"][n:], settings))


# --- inputs -------------------------------------------------------------------------------------


def _validation(
    home: Home, run_id: str, cur_version: str | None, tokenizer: Any, settings: Settings
) -> tuple[list[tuple[list[int], list[int]]], list[bool], list[str]]:
    """Rendered validation examples of the candidate's snapshot, which ones the current
    model never saw, and each one's last user question ("" for documents)."""
    info = read_json(home.run(run_id).train_json)
    val = sorted(load(home, info["snapshot"]).val)[: settings.gate.max_examples]
    seen = _seen_by(home, cur_version)
    out, new, questions = [], [], []
    for record_hash, record in zip(val, records(home, val)):
        try:
            example = render(tokenizer, record, settings.data.max_tokens, "truncate")
        except RenderError:
            continue
        out.append((example.input_ids, example.labels))
        new.append(record_hash not in seen)
        users = [m["content"] for m in record.body.get("messages", []) if m["role"] == "user"]
        questions.append(users[-1] if users else "")
    return out, new, questions


def _seen_by(home: Home, version: str | None) -> set[str]:
    """Records in the snapshot the version was trained on (none for the base)."""
    if not version:
        return set()
    if not home.version_json(version).exists():
        return set()  # a collection's first run is compared with the home's base
    snapshot_id = registry.get(home, version).get("snapshot")
    if not snapshot_id:
        return set()
    try:
        snap = load(home, snapshot_id)
    except DataError:
        return set()
    return set(snap.train) | set(snap.val)


def _general_probes() -> list[Any]:
    with resources.as_file(resources.files("appliance") / "data" / "general" / "probes.jsonl") as path:
        return load_probes(path)


def user_probes(home: Home) -> list[Any]:
    found = []
    for path in sorted(home.probes.glob("*.jsonl")) if home.probes.is_dir() else []:
        found += load_probes(path)
    return found


def _text_sequences(tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    text = (resources.files("appliance") / "data" / "general" / "text.txt").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + TEXT_CHUNK] for i in range(0, len(ids), TEXT_CHUNK)]
    return [(chunk, [-100] + chunk[1:]) for chunk in chunks if len(chunk) > 1]


def _prompt_ids(model: Path, chats: list[list[dict[str, Any]]], settings: Settings) -> list[list[int]]:
    """The ids the endpoint feeds the model for each conversation (its chat template, from the file)."""
    if not chats:
        return []
    result = llamacpp_child.run(model, chat=chats, threads=settings.train.threads)
    if not result.ok:
        raise GateError(f"cannot prepare the probe prompts: {result.error}")
    return result.chat


def _ask(
    model: Model,
    examples: list[tuple[list[int], list[int]]],
    text: list[tuple[list[int], list[int]]],
    prompts: list[list[int]],
    settings: Settings,
) -> dict[str, Any]:
    """One llama.cpp child per model: losses on validation and text, greedy probe answers."""
    result = llamacpp_child.run(
        model[0],
        nll=examples + text,
        generate=[(ids, settings.gate.probe_tokens) for ids in prompts],
        lora=model[1],
        threads=settings.train.threads,
        timeout=1800,
    )
    if not result.ok:
        raise GateError(f"llama.cpp could not evaluate {model[1] or model[0]}: {result.error}")
    return {"val": result.nll[: len(examples)], "text": result.nll[len(examples) :], "answers": result.generated}


# --- checks --------------------------------------------------------------------------------------


def bootstrap(diffs: list[float], samples: int, confidence: float, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the mean of ``diffs``."""
    values = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _per_example(nll: list[list[float]]) -> list[float]:
    return [s / n if n else 0.0 for s, n in nll]


def _loss_checks(
    cand: list[list[float]], cur: list[list[float]], new_mask: list[bool], settings: Settings, kind: str
) -> list[Check]:
    g = settings.gate
    if not cand:
        return [Check("validation_loss", None, detail="the snapshot has no validation examples to compare on")]
    a, b = _per_example(cand), _per_example(cur)
    diffs = [x - y for x, y in zip(a, b)]
    low, high = bootstrap(diffs, g.bootstrap_samples, g.confidence)
    mean_cand = sum(s for s, _ in cand) / max(1, sum(n for _, n in cand))
    mean_cur = sum(s for s, _ in cur) / max(1, sum(n for _, n in cur))
    value = {
        "candidate": mean_cand,
        "current": mean_cur,
        "mean_difference": sum(diffs) / len(diffs),
        "interval": [low, high],
        "confidence": g.confidence,
        "examples": len(diffs),
    }
    ok = low <= g.loss_margin
    words = (
        f"validation loss {mean_cand:.4f} vs current {mean_cur:.4f} on {len(diffs)} examples; the "
        f"{g.confidence:.0%} interval of the difference is {low:+.4f}..{high:+.4f}"
    )
    checks = [
        Check(
            "validation_loss",
            ok,
            value,
            {"interval_low_at_most": g.loss_margin},
            words + ("" if ok else f", worse than the current model beyond the margin {g.loss_margin}"),
        )
    ]
    new = [d for d, is_new in zip(diffs, new_mask) if is_new]
    if kind != "train" or not g.require_better_on_new:
        checks.append(Check("new_data", None, detail=f"not required for a {kind} run"))
    elif not new:
        checks.append(Check("new_data", None, detail="no validation example is new to the current model"))
    else:
        mean_new = sum(new) / len(new)
        ok = mean_new < 0
        checks.append(
            Check(
                "new_data",
                ok,
                {"mean_difference": mean_new, "examples": len(new)},
                {"below": 0.0},
                f"on {len(new)} validation examples the current model never saw, the loss changes by "
                f"{mean_new:+.4f}" + ("" if ok else ": the candidate did not learn the new data better"),
            )
        )
    return checks


# --- metrics people recognise (issue 10) -------------------------------------------------------

SAMPLE_QUESTIONS = 20
ANSWER_TOKENS = 48  # the reference is cut where the greedy answers are (gate.probe_tokens' default)


@dataclass(frozen=True)
class Question:
    prompt: list[int]  # the conversation up to its last answer, as trained
    answer: list[int]  # that answer's first ANSWER_TOKENS tokens
    text: str  # the last user question, for people to read


def _answer_sample(examples: list[tuple[list[int], list[int]]], questions: list[str]) -> list[Question]:
    """Up to SAMPLE_QUESTIONS validation conversations (documents have no question)."""
    sample = []
    for (ids, labels), text in zip(examples, questions):
        split = last_answer(ids, labels)
        if split is None or not text:
            continue
        sample.append(Question(split[0], split[1][:ANSWER_TOKENS], text))
        if len(sample) == SAMPLE_QUESTIONS:
            break
    return sample


def _metrics(
    tokenizer: Any, sample: list[Question], cand: dict[str, Any], cur: dict[str, Any], skip: int
) -> dict[str, Any]:
    """Validation loss and perplexity of both models, and on the sampled questions exact
    match, token F1, ROUGE-L and BLEU of their greedy answers against the reference."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    references = [decode(q.answer) for q in sample]
    out: dict[str, Any] = {"sample": []}
    answers = {}
    for name, result in (("candidate", cand), ("current", cur)):
        said = [decode(ids) for ids in result["answers"][skip : skip + len(sample)]]
        answers[name] = said
        loss = sum(s for s, _ in result["val"]) / max(1, sum(n for _, n in result["val"]))
        out[name] = {
            "validation_loss": loss,
            "validation_perplexity": perplexity(loss),
            "general_text_perplexity": _perplexity(result["text"]),
            **answer_metrics(said, references),
        }
    for q, reference, a, b in zip(sample, references, answers["candidate"], answers["current"]):
        out["sample"].append({"question": q.text, "reference": reference, "candidate": a, "current": b})
    return out


def _hits(tokenizer: Any, probes: list[Any], answers: list[list[int]]) -> list[bool]:
    return [p.hit(tokenizer.decode(ids, skip_special_tokens=True)) for p, ids in zip(probes, answers)]


def _general_checks(
    tokenizer: Any, general: list[Any], cand: dict[str, Any], cur: dict[str, Any], n: int, settings: Settings
) -> list[Check]:
    g = settings.gate
    hits_cand = sum(_hits(tokenizer, general, cand["answers"][:n])) / max(1, n)
    hits_cur = sum(_hits(tokenizer, general, cur["answers"][:n])) / max(1, n)
    ok = hits_cand >= hits_cur - g.general_max_drop
    probes = Check(
        "general_probes",
        ok,
        {"candidate": hits_cand, "current": hits_cur, "questions": n},
        {"max_drop": g.general_max_drop},
        f"general questions answered {hits_cand:.0%} vs current {hits_cur:.0%}"
        + ("" if ok else f": fell by more than {g.general_max_drop:.0%}"),
    )
    ppl_cand, ppl_cur = _perplexity(cand["text"]), _perplexity(cur["text"])
    ratio = ppl_cand / ppl_cur if ppl_cur > 0 else math.inf
    ok = ratio <= g.general_max_ppl_ratio
    ppl = Check(
        "general_perplexity",
        ok,
        {"candidate": ppl_cand, "current": ppl_cur, "ratio": ratio},
        {"max_ratio": g.general_max_ppl_ratio},
        f"perplexity on general text {ppl_cand:.2f} vs current {ppl_cur:.2f} (x{ratio:.3f})"
        + ("" if ok else f": rose more than x{g.general_max_ppl_ratio}"),
    )
    return [probes, ppl]


def _perplexity(nll: list[list[float]]) -> float:
    total, count = sum(s for s, _ in nll), sum(n for _, n in nll)
    return math.exp(total / count) if count else math.nan


def _user_check(
    tokenizer: Any, user: list[Any], cand: list[list[int]], cur: list[list[int]], settings: Settings
) -> Check:
    if not user:
        return Check("user_probes", None, detail="no questions in the home's probes/ folder")
    a = sum(_hits(tokenizer, user, cand)) / len(user)
    b = sum(_hits(tokenizer, user, cur)) / len(user)
    ok = a >= b - settings.gate.user_max_drop
    return Check(
        "user_probes",
        ok,
        {"candidate": a, "current": b, "questions": len(user)},
        {"max_drop": settings.gate.user_max_drop},
        f"your probe questions answered {a:.0%} vs current {b:.0%}" + ("" if ok else ": the score dropped"),
    )


def load_report(home: Home, run_id: str) -> dict[str, Any] | None:
    path = home.run(run_id).eval
    return read_json(path) if path.exists() else None
