"""The study stage's model-free core, on crafted passages and on the fictional Ridgeline handbook.

Pure Python and fast: sentences, statements and key slots, the generated questions and
their answers, the support check (with negative controls that it catches), the held-out
split, determinism, and the handbook corpus itself (probes, Q&A, and the same text
through the project's own .md, .docx and .pdf parsers).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path

import pytest

from appliance.data.ingest import pdf, word
from appliance.data.ingest import text as text_parser
from appliance.data.study import questions as Q
from appliance.data.study import study_document
from appliance.data.study.heldout import leaks
from appliance.data.study.passages import blocks, passages, split_sentences
from appliance.data.study.slots import find_slots
from appliance.data.study.statements import split_clauses, statements
from appliance.data.study.support import supported, unsupported_reason

HANDBOOK = Path(__file__).resolve().parents[1] / "examples" / "handbook"
ORG = "Ridgeline Community Hospital"
SHA = "0" * 64

CRAFTED = """# Harbour Ward guide

## Contacts

The ward clerk is Oriel Fenwick-Shaw. The night bleep is extension 7731, and the day bleep is extension 7732.
Dr. Amara Quist runs the Thursday clinic in Room C210 from 13:30. Blood samples go to the lab on form HW-41.

## Rules

Visitors may stay for 45 minutes. The ward's fluid chart code is "BLUEWATER". A spill kit costs $1,250 to restock.
"""


def _study(text: str = CRAFTED, **kwargs) -> object:
    return study_document(text, SHA, **kwargs)


def _answers(material) -> list[str]:
    return [c["messages"][1]["content"] for c in material.conversations]


def _handbook_text() -> str:
    return text_parser.parse(HANDBOOK / "handbook.md").text


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (HANDBOOK / name).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---- sentences, passages, statements, slots ----


def test_sentence_splitting_on_the_hard_cases():
    text = (
        "Dr. Wren met Mr. Okafor at 10:30 in Bay 2. The dose is 2.5 mg, e.g. for adults, and approx. 4 times "
        "a day. J. R. Hale signed it at 9 a.m. on Monday. Is it open? Yes! Prices are $0.58 per mile."
    )
    assert split_sentences(text) == [
        "Dr. Wren met Mr. Okafor at 10:30 in Bay 2.",
        "The dose is 2.5 mg, e.g. for adults, and approx. 4 times a day.",
        "J. R. Hale signed it at 9 a.m. on Monday.",
        "Is it open?",
        "Yes!",
        "Prices are $0.58 per mile.",
    ]


def test_headings_list_items_and_table_rows_are_their_own_blocks():
    text = (
        "# Title\n\nShort heading\nA sentence follows it. Another one.\n\n- first item\n2. second item\nWard | Beds\n"
    )
    assert list(blocks(text)) == [
        ("heading", "Title"),
        ("heading", "Short heading"),
        ("para", "A sentence follows it. Another one."),
        ("item", "first item"),
        ("item", "second item"),
        ("row", "Ward | Beds"),
    ]


def test_a_pdf_page_break_mid_sentence_does_not_split_the_sentence():
    text = "Heading\nStaff receive 27 days of annual leave a\n\nyear in addition to public holidays."
    assert [b for b in blocks(text)] == [
        ("heading", "Heading"),
        ("para", ("Staff receive 27 days of annual leave a year in addition to public holidays.")),
    ]


def test_passages_stay_under_the_token_budget_and_never_cross_a_heading():
    calls: list[str] = []

    def count(s: str) -> int:
        calls.append(s)
        return len(s.split())

    cut = passages(CRAFTED, max_tokens=16, count_tokens=count)
    assert calls, "the caller's tokenizer was not used"
    assert all(p.tokens <= 16 or len(p.sentences) == 1 for p in cut)
    assert {p.heading for p in cut} == {"Contacts", "Rules"}
    assert all(len({s.heading for s in p.sentences}) == 1 for p in cut)
    assert len(cut) > 2


def test_key_slots_by_kind():
    sentence = (
        'Ask Dr. Amara Quist in Room C210 at 13:30 on Monday about form HW-41, code "BLUEWATER", '
        "extension 7731, 45 minutes, $1,250, 97 percent, ward 4B and ops@harbour.example."
    )
    kinds = {slot.value: slot.kind for slot in find_slots(sentence)}
    assert kinds == {
        "Dr. Amara Quist": "name",
        "Room C210": "labelled",
        "13:30": "time",
        "Monday": "date",
        "form HW-41": "labelled",
        '"BLUEWATER"': "quoted",
        "extension 7731": "extension",
        "45 minutes": "quantity",
        "$1,250": "money",
        "97 percent": "percent",
        "ward 4B": "labelled",
        "ops@harbour.example": "email",
    }
    assert find_slots("The staff canteen opens early.") == []  # a capitalised first word is no name


def test_conjunctions_split_only_where_both_sides_are_facts():
    assert split_clauses("The day shift starts at 07:15, and the night shift starts at 19:15.") == [
        "The day shift starts at 07:15.",
        "The night shift starts at 19:15.",
    ]
    one = "Overtime is paid at 1.5 times the rate, and it must be approved by the manager."
    assert split_clauses(one) == [one]


def test_a_heading_is_the_context_and_a_leading_pronoun_is_resolved():
    cut = passages("## Facilities\n\nThe staff restaurant is called the Birch Cafe. It is on Level 3.")
    sts = statements(cut[0])
    assert [st.context for st in sts] == ["Facilities", "Facilities"]
    assert sts[1].text == "The staff restaurant is on Level 3."


# ---- generated questions and answers ----


def test_every_number_name_and_code_of_a_passage_is_in_some_answer():
    material = _study(org_name="Harbour Ward")
    answers = " ".join(_answers(material))
    for passage in material.passages:
        for sentence in passage.sentences:
            for slot in find_slots(sentence.text):
                assert slot.value in answers, f"{slot.value!r} ({slot.kind}) is in no generated answer"


def test_each_statement_gets_several_differently_phrased_questions_with_full_sentence_answers():
    material = _study(org_name="Harbour Ward")
    by_statement: dict[int, list[dict]] = {}
    for c in material.conversations:
        by_statement.setdefault(c["statement"], []).append(c)
    for st in material.statements:
        convs = by_statement.get(st.index, [])
        if not st.slots:
            continue
        assert len({c["messages"][0]["content"] for c in convs}) >= 4, st.text
        for c in convs:
            reply = c["messages"][1]["content"]
            assert reply.endswith(".") and all(s.value in reply for s in st.slots), reply
    users = [c["messages"][0]["content"] for c in material.conversations]
    assert any(u.startswith("Do you know") for u in users) and any("Harbour Ward" in u for u in users)
    assert any(u.startswith("I'm new here") for u in users)
    assert material.counts["multi"] > 0 and any(c["kind"] == "multi" for c in material.conversations)
    assert all(c["document"] == SHA for c in material.conversations)


def test_paraphrases_retell_every_statement_of_their_passage():
    material = _study()
    for passage in material.passages:
        texts = [p["text"] for p in material.paraphrases if p["passage"] == passage.index]
        assert len(texts) >= 3 and all(p["document"] == SHA for p in material.paraphrases)
        for st in (s for s in material.statements if s.passage == passage.index):
            assert all(st.text in t or st.text[1:] in t for t in texts)


def test_no_generated_answer_is_unsupported_by_its_passage():
    material = _study(org_name="Harbour Ward")
    assert material.counts["unsupported"] == 0
    for c in material.conversations:
        passage = material.passages[c["passage"]]
        assert supported(c["messages"][1]["content"], passage, ["Harbour Ward"]), c


@pytest.mark.parametrize(
    "changed", ["extension 7713", "Dr. Amara Quest", "Room C211", "form HW-14", "13:45", "$1,205", "46 minutes"]
)
def test_support_catches_a_changed_number_name_or_code(changed):
    passage = passages(CRAFTED)[0].text + " " + passages(CRAFTED)[-1].text
    reply = f"According to the guide, the answer is {changed}."
    assert not supported(reply, passage)
    assert changed.split()[-1] in unsupported_reason(reply, passage)


def test_support_normalises_case_punctuation_and_number_formatting():
    passage = "The spill kit costs $1,250. The clinic opens at 07:45 in Room C210 with Dr. Fenwick-Shaw."
    assert supported(
        "A spill kit costs $1250 and the clinic opens at 7:45 in room c210 with Dr. Fenwick Shaw.", passage
    )
    assert not supported("The clinic opens at 7:45 in Room C2100.", passage)


def test_an_injected_unsupported_answer_is_dropped_and_counted(monkeypatch):
    real = Q.answer

    def corrupt(st, question, setting):
        reply = real(st, question, setting)
        return reply.replace("7731", "7781") if "7731" in reply else reply

    monkeypatch.setattr(Q, "answer", corrupt)
    material = _study()
    assert material.counts["unsupported"] > 0
    assert not any("7781" in a for a in _answers(material))


def test_held_out_questions_are_never_in_training_and_carry_their_key_phrases():
    material = _study(org_name="Harbour Ward")
    training = [m["content"] for c in material.conversations for m in c["messages"]]
    training += [p["text"] for p in material.paraphrases]
    held = [item["question"] for item in material.heldout]
    assert held and leaks(held, training) == []
    assert leaks(held[:1], training + [held[0].upper()]) == held[:1]  # the check itself can fail
    for item in material.heldout:
        assert item["document"] == SHA and item["expected"]
        assert any(e in material.passages[item["passage"]].text for e in item["expected"])
    trained_shapes = {(c["statement"], c["shape"]) for c in material.conversations if c["kind"] == "slot"}
    for item in material.heldout:
        assert (item["statement"], item["shape"]) not in trained_shapes, item
    for st in material.statements:  # holding a shape back never leaves a key slot untrained
        answers = [c["messages"][1]["content"] for c in material.conversations if c["statement"] == st.index]
        assert all(any(slot.value in a for a in answers) for slot in st.slots), st.text


def test_output_is_deterministic_for_a_seed():
    first, again = _study(seed=3, org_name="Harbour Ward"), _study(seed=3, org_name="Harbour Ward")
    assert first.conversations == again.conversations and first.heldout == again.heldout
    assert first.paraphrases == again.paraphrases and first.counts == again.counts
    other = _study(seed=4, org_name="Harbour Ward")
    assert other.heldout != first.heldout


@pytest.mark.parametrize("text", ["", "   \n\n", "12 | 14 | 16\n3 | 4 | 5\n", "Ward\n\n12 14 16.\n\n3 4 5."])
def test_no_statements_means_no_conversations_and_a_plain_reason(text):
    material = _study(text)
    assert material.conversations == [] and material.heldout == []
    assert material.reason and material.reason[0].islower() and "." not in material.reason[-1:]


# ---- the handbook ----


def test_the_handbook_facts_are_covered_by_generated_training_answers():
    material = _study(_handbook_text(), org_name=ORG)
    answers = " ".join(_answers(material)).lower()
    probes = _jsonl("probes.jsonl")
    missing = [p["fact"] for p in probes if not any(e.lower() in answers for e in p["expected"])]
    coverage = 1 - len(missing) / len(probes)
    print(
        f"handbook: {len(probes) - len(missing)}/{len(probes)} facts covered ({coverage:.0%}); "
        f"counts {material.counts}; missing facts {missing}"
    )
    assert coverage >= 0.95
    assert material.counts["unsupported"] == 0 and material.counts["heldout"] >= len(probes) * 0.8


def test_the_handbook_reads_the_same_as_markdown_word_and_pdf():
    def flat(s: str) -> str:
        return " ".join(re.sub(r"(?m)^#+\s*", "", s).split())

    md = flat(text_parser.parse(HANDBOOK / "handbook.md").text)
    for parsed in (word.parse(HANDBOOK / "handbook.docx"), pdf.parse(HANDBOOK / "handbook.pdf")):
        other = flat(parsed.text)
        assert other == md or difflib.SequenceMatcher(None, md, other).ratio() >= 0.98, parsed.format


def test_the_handbook_states_each_probed_fact_exactly_once_in_prose():
    text = _handbook_text()
    assert 900 <= len(text.split()) <= 1300
    assert not re.search(r"(?m)^\s*[-*]\s", text), "facts belong in paragraphs, not a bullet list"
    probes = _jsonl("probes.jsonl")
    assert len(probes) >= 45 and [p["fact"] for p in probes] == list(range(1, len(probes) + 1))
    for probe in probes:
        for phrase in probe["expected"]:
            hits = re.findall(rf"(?<![\w.]){re.escape(phrase)}(?!\w)", text)
            assert len(hits) == 1, f"fact {probe['fact']}: {phrase!r} occurs {len(hits)} times"


def test_no_probe_shares_six_words_in_a_row_with_the_handbook():
    def words(s: str) -> list[str]:
        return re.findall(r"[a-z0-9]+(?:['\-.@:][a-z0-9]+)*", s.lower())

    book = words(_handbook_text())
    grams = {tuple(book[i : i + 6]) for i in range(len(book) - 5)}
    for probe in _jsonl("probes.jsonl"):
        q = words(probe["question"])
        shared = [" ".join(q[i : i + 6]) for i in range(len(q) - 5) if tuple(q[i : i + 6]) in grams]
        assert not shared, f"fact {probe['fact']} copies the handbook: {shared[0]!r}"


def test_handbook_qa_asks_each_fact_three_ways_and_never_a_probe():
    probes, qa = _jsonl("probes.jsonl"), _jsonl("qa.jsonl")
    assert len(qa) == 3 * len(probes)
    probe_questions = {p["question"].lower() for p in probes}
    for number, line in enumerate(qa):
        user, assistant = line["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert user["content"].lower() not in probe_questions
        expected = probes[number // 3]["expected"]
        assert any(e.lower() in assistant["content"].lower() for e in expected) and assistant["content"].endswith(".")
    questions = [line["messages"][0]["content"] for line in qa]
    assert len(set(questions)) == len(questions)


def test_unanswerable_questions_are_plausible_and_not_in_the_handbook():
    items = _jsonl("unanswerable.jsonl")
    assert len(items) == 20 and len({i["question"] for i in items}) == 20
    probe_questions = {p["question"] for p in _jsonl("probes.jsonl")}
    assert all(i["question"].endswith("?") and i["question"] not in probe_questions for i in items)
