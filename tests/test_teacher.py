"""The study teacher (appliance/data/study/teacher.py): a local GGUF run by llama.cpp in a child
writes extra questions per fact; the checks keep only questions about the fact; a missing or
corrupt teacher file is one warning and the model-free floor goes on alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_study_stage import documents_home

from appliance.contract.events import Message
from appliance.data.snapshot import cut
from appliance.data.study.stage import study
from appliance.data.study.teacher import acceptable, teach, teacher_model
from appliance.export.convert import convert
from appliance.home.config import load
from appliance.home.paths import Home

FACT = "Orientation for new staff begins at 07:45 on the first Monday, in the Aldergrove Auditorium."


def test_only_questions_about_the_fact_pass():
    assert acceptable("When does orientation for new staff begin?", FACT)
    assert acceptable("Where is the orientation held on the first Monday?", FACT)
    assert not acceptable("When does orientation begin", FACT)  # not a question
    assert not acceptable("Why?", FACT)  # too short
    assert not acceptable("What is the capital city of the nation of France today?", FACT)  # not about the fact
    assert not acceptable("What " + "very " * 40 + "long question is this about orientation?", FACT)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    return convert(tiny_base, tmp_path_factory.mktemp("teacher") / "tiny-f16.gguf")


def test_a_real_teacher_runs_in_a_child_and_its_questions_are_checked(tiny_gguf: Path):
    taught = teach(tiny_gguf, [FACT, "Salaries are paid on the 26th of each month."], 3, set(), [])
    assert taught.error is None
    assert taught.written >= taught.accepted >= 0
    for index, questions in taught.questions.items():  # whatever a random model wrote, only checked questions
        assert all(acceptable(q, [FACT, "Salaries are paid on the 26th of each month."][index]) for q in questions)


def test_a_corrupt_teacher_is_one_line_and_the_floor_goes_on(tiny_home: Home, tmp_path: Path):
    documents_home(tiny_home)
    bad = tmp_path / "teacher.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    settings = load(tiny_home.config)
    settings.study.teacher = str(bad)
    events: list[object] = []
    material = study(tiny_home, cut(tiny_home, settings.data.val_fraction), settings, events.append)
    warnings = [e.text for e in events if isinstance(e, Message) and e.level == "warning" and "teacher" in e.text]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "model-free" in warnings[0]
    assert material.counts()["conversations"] > 100 and material.counts()["teacher_accepted"] == 0


def test_auto_skips_a_model_too_small_to_teach(tiny_home: Home):
    settings = load(tiny_home.config)
    assert teacher_model(tiny_home, "off") is None
    assert teacher_model(tiny_home, "/models/teacher-8b.gguf") == Path("/models/teacher-8b.gguf")
    # the home has no exported version here: nothing to teach with
    assert teacher_model(tiny_home, "auto", settings.study.teacher_min_gb) is None
