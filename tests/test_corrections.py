"""A correction written from the chat becomes ordinary chat data in the inbox."""

from __future__ import annotations

import json

import pytest

from appliance.contract.errors import DataError
from appliance.data.corrections import write_correction
from appliance.data.ingest import ingest
from appliance.home.paths import Home


def test_correction_lands_in_the_inbox_and_is_ingested(tiny_home: Home):
    (tiny_home.inbox / "policies.jsonl").unlink()
    question = [
        {"role": "user", "content": "Which extension reaches the on-call pharmacist?"},
        {"role": "assistant", "content": "Extension 1234."},
    ]  # the wrong answer, replaced
    path = write_correction(tiny_home, question, "Extension 4417, day or night.")
    assert path.parent == tiny_home.inbox and path.name.startswith("correction-")
    saved = json.loads(path.read_text())
    assert saved["messages"][-1] == {"role": "assistant", "content": "Extension 4417, day or night."}
    assert len(saved["messages"]) == 2 and saved["correction"]["by"]
    report = ingest(tiny_home)
    assert report.accepted == 1 and not report.quarantined


@pytest.mark.parametrize(
    "messages, answer, why",
    [
        ([{"role": "user", "content": "Q?"}], "   ", "needs the right answer"),
        ([{"role": "system", "content": "be brief"}], "A.", "up to the user's question"),
        ([], "A.", "up to the user's question"),
    ],
)
def test_unusable_corrections_are_refused_in_one_line(tiny_home: Home, messages, answer, why):
    with pytest.raises(DataError, match=why):
        write_correction(tiny_home, messages, answer)
    assert not list(tiny_home.inbox.glob("correction-*"))
