"""The data advisor on crafted data: tiny, no validation split, one dominant source,
probe questions leaking into training (removed from training), over- and underfitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE, tiny_settings

from appliance.data import snapshot
from appliance.data.decontaminate import decontaminate, find_leaks
from appliance.data.ingest import ingest
from appliance.data.ingest.records import Record
from appliance.home.config import load
from appliance.home.paths import Home
from appliance.quality.advise import Advice, advise_data, advise_run


def chat(question: str, answer: str) -> Record:
    return Record(
        "chat", {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    )


def codes(advice: list[Advice]) -> dict[str, str]:
    return {a.code: a.level for a in advice}


def write_chats(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in pairs
        )
    )


# --- near-duplicates -----------------------------------------------------------------------


def test_copied_and_lightly_edited_questions_are_leaks_paraphrases_are_not():
    probes = [("Which room houses our infusion service?", "p.jsonl")]
    copied = chat("which room houses our infusion service?", "C318")
    edited = chat("Tell me: which room houses our infusion service today?", "C318")
    paraphrase = chat("Where do patients go for infusions?", "C318")
    in_text = Record("text", {"text": "FAQ. Which room houses our infusion service? Room C318, second floor."})
    leaks = find_leaks([copied, edited, paraphrase, in_text], probes)
    assert {leak.record for leak in leaks} == {copied.hash, edited.hash, in_text.hash}


def test_no_clinic_probe_is_flagged_in_the_clinic_training_data():
    """The sample probes are paraphrases written not to leak: none may be removed."""
    records = [
        chat(m["messages"][0]["content"], m["messages"][1]["content"])
        for m in map(json.loads, (SAMPLE / "policies.jsonl").read_text().splitlines())
    ]
    probes = [
        (json.loads(line)["question"], "probes.jsonl") for line in (SAMPLE / "probes.jsonl").read_text().splitlines()
    ]
    assert find_leaks(records, probes) == []


# --- advice on crafted homes -----------------------------------------------------------------


def crafted_home(tiny_home: Home, val_fraction: float) -> tuple[Home, str]:
    settings = tiny_settings()
    settings.data.val_fraction = val_fraction
    (tiny_home.inbox / "policies.jsonl").unlink()
    write_chats(
        tiny_home.inbox / "big.jsonl", [(f"Question number {i} about the ward?", f"Answer {i}.") for i in range(40)]
    )
    write_chats(
        tiny_home.inbox / "small.jsonl",
        [("What colour is the visitor pass?", "Tangerine."), ("Which room houses our infusion service?", "Room C318.")],
    )
    (tiny_home.probes / "mine.jsonl").write_text(
        json.dumps({"question": "Which room houses our infusion service?", "expected": ["C318"]}) + "\n"
    )
    ingest(tiny_home, settings=settings)
    return tiny_home, snapshot.cut_id(tiny_home, val_fraction)


def test_tiny_dominated_contaminated_data_gets_every_warning(tiny_home: Home):
    home, snap = crafted_home(tiny_home, 0.0)
    advice = advise_data(home, snap)
    assert codes(advice) == {
        "few_examples": "warning",
        "no_validation": "warning",
        "dominant_source": "warning",
        "probe_leak": "warning",
    }
    text = " ".join(a.message for a in advice)
    assert "big.jsonl" in text and "prompt" in text and "infusion" in text


def test_healthy_data_gets_no_warning_but_size(tiny_home: Home):
    settings = load(tiny_home.config)
    ingest(tiny_home, settings=settings)  # the 168 clinic conversations, one file, no probes leaking
    snap = snapshot.cut_id(tiny_home, 0.1)
    levels = codes(advise_data(tiny_home, snap))
    assert levels == {"few_examples": "warning", "no_validation": "ok", "dominant_source": "ok", "probe_leak": "ok"}


def test_decontamination_removes_exactly_the_leaking_records(tiny_home: Home):
    home, snap = crafted_home(tiny_home, 0.0)
    train = snapshot.records(home, snapshot.load(home, snap).train)
    kept, leaks = decontaminate(home, train)
    assert len(kept) == len(train) - 1
    assert [leak.probe for leak in leaks] == ["Which room houses our infusion service?"]
    assert all("infusion" not in json.dumps(r.body) for r in kept)


@pytest.mark.slow
def test_training_drops_leaking_records_and_reports_them(tiny_home: Home):
    from appliance.contract.api import open_engine

    home, snap = crafted_home(tiny_home, 0.0)
    run = open_engine(home.root).train(snapshot=snap, max_steps=1)
    info = json.loads((home.run(run).root / "train.json").read_text())
    assert info["train_examples"] == 41 and len(info["decontaminated"]) == 1


# --- advice on a run's curve ---------------------------------------------------------------


def curve(losses: list[float], vals: list[float | None]) -> list[dict]:
    return [
        {"step": i + 1, "loss": loss, **({"val_loss": v} if v is not None else {})}
        for i, (loss, v) in enumerate(zip(losses, vals))
    ]


def test_overfitting_curve():
    advice = advise_run(curve([3.0, 2.0, 1.0, 0.5, 0.2, 0.1], [None, 2.5, None, 2.2, None, 2.9]))
    assert advice[0].code == "overfitting" and "fewer epochs" in advice[0].message


def test_underfitting_curve():
    advice = advise_run(curve([4.0, 3.95, 3.9, 3.9], [None, 3.9, None, 3.85]))
    assert advice[0].code == "underfitting" and "more data" in advice[0].message.lower()


def test_good_fit_curve():
    advice = advise_run(curve([3.0, 2.0, 1.5, 1.2], [None, 1.9, None, 1.4]))
    assert advice[0] == Advice("ok", "fit", advice[0].message) and "1.40" in advice[0].message


def test_advise_command_reports_warnings_as_json(tiny_home: Home):
    from appliance.cli.command import main

    crafted_home(tiny_home, 0.0)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["advise", "--home", str(tiny_home.root), "--json"]) == 0
    report = json.loads(out.getvalue())
    warned = {a["code"] for a in report["advice"] if a["level"] == "warning"}
    assert warned == {"few_examples", "dominant_source", "probe_leak"} and report["warnings"] == 3
