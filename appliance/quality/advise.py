"""The data advisor: plain-words warnings before a run wastes a week, and after it.

``advise_data`` looks at the data a run would train on (size, validation split, one
source dominating, probe questions leaking into training, found by
:mod:`appliance.data.decontaminate`); ``advise_run`` reads a finished run's loss curve
(overfitting, underfitting).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from appliance.data.decontaminate import Leak, find_leaks, probe_questions
from appliance.data.snapshot import load, records, stats
from appliance.home.paths import Home

MIN_EXAMPLES = 500
DOMINANT_SHARE = 0.6  # one source holding more than this share of the records


@dataclass(frozen=True)
class Advice:
    level: str  # "warning" or "ok"
    code: str  # stable, for scripts and the TUI: few_examples, no_validation, dominant_source, ...
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# --- advice on the data -------------------------------------------------------------------


def advise_data(home: Home, snapshot_id: str) -> list[Advice]:
    info = stats(home, snapshot_id)
    advice = [_size(info["train"]), _validation(info["val"])]
    advice.append(_dominance(info.get("by_source", [])))
    leaks = find_leaks(records(home, load(home, snapshot_id).train), probe_questions(home))
    advice.append(_leaks(leaks))
    return advice


def _size(n: int) -> Advice:
    if n < MIN_EXAMPLES:
        return Advice(
            "warning",
            "few_examples",
            f"Only {n} training examples: with fewer than {MIN_EXAMPLES}, giving the base model these "
            "documents in its prompt may serve better than fine-tuning.",
        )
    return Advice("ok", "few_examples", f"{n} training examples.")


def _validation(n: int) -> Advice:
    if n == 0:
        return Advice(
            "warning",
            "no_validation",
            "No validation examples: nothing can tell whether the model is learning or memorising. "
            "Add data, or raise [data] val_fraction.",
        )
    return Advice("ok", "no_validation", f"{n} validation examples held out.")


def _dominance(sources: Iterable[dict[str, Any]]) -> Advice:
    counts = [(s.get("path") or s.get("sha256", "?"), int(s.get("records", 0))) for s in sources]
    total = sum(n for _, n in counts)
    if len(counts) < 2 or total == 0:
        return Advice("ok", "dominant_source", f"{len(counts)} source document(s).")
    path, top = max(counts, key=lambda c: c[1])
    if top / total > DOMINANT_SHARE:
        return Advice(
            "warning",
            "dominant_source",
            f"One source dominates: {path} holds {top / total:.0%} of the records; the model will mostly "
            "learn its style and topics. Add data from other sources or split it.",
        )
    return Advice("ok", "dominant_source", f"{len(counts)} sources; the largest holds {top / total:.0%}.")


def _leaks(leaks: list[Leak]) -> Advice:
    if not leaks:
        return Advice("ok", "probe_leak", "No probe question appears in the training data.")
    records = len({leak.record for leak in leaks})
    example = leaks[0]
    return Advice(
        "warning",
        "probe_leak",
        f"{len({leak.probe for leak in leaks})} probe question(s) appear in {records} training example(s) "
        f"(e.g. {example.probe!r} from {example.source}); those examples are removed from training so "
        "the probe still measures learning.",
    )


# --- advice on a finished run --------------------------------------------------------------

HIGH_LOSS = 2.0  # nats per token: a tuned model still this unsure of its own data has not learned it


def advise_run(curve: Sequence[dict[str, Any]]) -> list[Advice]:
    """Overfitting or underfitting, from a run's curve (``train.json``'s points)."""
    val = [(p["step"], p["val_loss"]) for p in curve if p.get("val_loss") is not None]
    train = [p["loss"] for p in curve if p.get("loss") is not None]
    if len(val) < 2 or len(train) < 2:
        return [Advice("ok", "fit", "Too few validation checks to judge the fit.")]
    best_step, best = min(val, key=lambda v: v[1])
    last_step, last = val[-1]
    head, tail = _mean(train[: max(1, len(train) // 4)]), _mean(train[-max(1, len(train) // 4) :])
    if last > best * 1.05 and tail < head and best_step < last_step:
        return [
            Advice(
                "warning",
                "overfitting",
                f"Overfitting: training loss kept falling ({head:.2f} → {tail:.2f}) while validation loss "
                f"rose from {best:.2f} at step {best_step} to {last:.2f}. Try fewer epochs or a lower LoRA "
                "rank ([train] epochs, lora_r); the best checkpoint was kept.",
            )
        ]
    if tail > HIGH_LOSS and best > HIGH_LOSS and tail > 0.9 * head:
        return [
            Advice(
                "warning",
                "underfitting",
                f"Underfitting: training loss ({head:.2f} → {tail:.2f}) and validation loss ({best:.2f}) "
                "both stay high. More data, more epochs, a higher learning rate or rank, or a larger base "
                "model may help.",
            )
        ]
    return [Advice("ok", "fit", f"Training and validation loss fell together (best validation {best:.2f}).")]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
