"""Held-out questions: per statement, one question shape is kept back from training.

A tuned model is then asked about every fact in a shape it never trained on for that
fact, which is what a staff member's question will be. The shapes are the fronted question
("At what time does the day shift start?"), the embedded one ("Do you know at what time
the day shift starts?") and the echo ("The day shift starts at what time?"); every framing
built on the kept-back shape ("I'm new here — ...") is kept back with it, so no held-out
question is a training question with a prefix. The shape rotates from statement to
statement and is chosen by the statement's number and the seed alone: the split is the
same on every run. A statement keeps a shape back only when every one of its key slots is
still asked in training, in at least two questions that are not fill-in-the-blanks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from appliance.data.study.questions import Question

SHAPES = ("embedded", "fronted", "echo")
MIN_TRAINING = 2


def split(questions: list[Question], seed: int = 0) -> tuple[list[Question], list[Question]]:
    """(training, held out) for one statement's questions."""
    if not questions:
        return [], []
    index = questions[0].statement
    for turn in range(len(SHAPES)):
        kept_back = SHAPES[(index + seed + turn) % len(SHAPES)]
        held = [q for q in questions if q.shape == kept_back]
        training = [q for q in questions if q.shape != kept_back]
        if held and _still_trained(questions, training):
            return training, held
    return questions, []


def _still_trained(questions: list[Question], training: list[Question]) -> bool:
    """Every slot keeps a question, and at least two training questions are real questions (not fill-ins)."""
    asked = {q.expected for q in questions}
    kept = {q.expected for q in training if q.shape in SHAPES}
    return asked <= kept and sum(q.shape in SHAPES for q in training) >= MIN_TRAINING


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def leaks(heldout: Iterable[str], training_texts: Iterable[str]) -> list[str]:
    """Held-out questions whose text (normalised) appears inside any training text; [] when clean."""
    corpus = "\n".join(f" {_norm(text)} " for text in training_texts)
    return [question for question in heldout if f" {_norm(question)} " in corpus]
