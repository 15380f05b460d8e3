"""Grounded answers with sources (issue 18), against the real server on the tiny model: the
passage index kept in step by ingest and forget, ``sources`` through the official ``openai``
client (plain and streamed), walls between collections, hostile questions, a corrupt index
rebuilt, and the request log line holding counts only.

The tiny random model's words mean nothing; what is checked is what reaches it (the prompt
grows by the passages: its token count) and what comes back (the sources)."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import REPO, free_port, tiny_settings
from test_serve_collections import add_adapter, random_lora

from appliance.cli.init import create_home
from appliance.data import wordvectors
from appliance.data.grounded import Source, cited, grounded_messages
from appliance.data.index import Index
from appliance.data.ingest import ingest, passages
from appliance.engine.forget import forget
from appliance.export.convert import convert
from appliance.home import registry
from appliance.home.config import Settings, dump, load
from appliance.home.keys import KeyStore
from appliance.home.paths import Home
from appliance.serving.guard import read_api_key
from appliance.serving.server import Server

CARDIO, LEGAL = "cardiology", "legal"
SHARED_DOC = """# Staff handbook

## Badges

Bring photo identification to the Security Office in Room G14, where your staff badge is
printed while you wait. A lost badge costs $18 to replace.

## Pay

Salaries are paid on the 26th of each month. Business mileage is reimbursed at $0.58 per mile.
"""
# the same question, different answers in two collections: a wall that leaks shows at once
CARDIO_DOC = "Visiting hours on the cardiology ward end at 20:00. The ward's canary word is heliotrope-4411.\n"
LEGAL_DOC = "Visiting hours for the legal archive end at 16:00. The archive's canary word is marigold-9275.\n"
HOSTILE = [
    '"',
    'what "is NEAR(badge lost)" *',
    "-badge OR NOT pay AND ^x:y",
    "column:text badge*",
    "))))((((",
    "バッジの交換費用はいくらですか",
    "",
    "   ",
]


@pytest.fixture(scope="module")
def grounded(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    root = tmp_path_factory.mktemp("grounding")
    home = create_home(root / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    (home.inbox / "handbook.md").write_text(SHARED_DOC)
    for collection, text in ((CARDIO, CARDIO_DOC), (LEGAL, LEGAL_DOC)):
        (home.inbox / collection).mkdir()
        (home.inbox / collection / "visiting.md").write_text(text)
    report = ingest(home)
    assert report.indexed == 3, report
    registry.add(home, "base", convert(tiny_base, root / "base.gguf"), {"quant": "F16"})
    registry.promote(home, "base")
    for collection, seed in ((CARDIO, 1), (LEGAL, 2)):
        add_adapter(home, collection, "v1", random_lora(tiny_base, seed, root / collection))
        registry.promote(home.scoped(collection), "v1")
    keys = KeyStore(home)
    secrets = {"cardio": keys.add("cardio-desk", "chat", [CARDIO]), "admin": read_api_key(home)}
    server = Server(home, load(home.config), port=free_port()).start()
    yield {
        "home": home,
        "server": server,
        "clients": {
            who: openai.OpenAI(base_url=server.url + "/v1", api_key=secret, max_retries=0, timeout=120)
            for who, secret in secrets.items()
        },
        "secrets": secrets,
    }
    server.stop()


def ask(client: openai.OpenAI, question: str, model: str = "appliance", **extra):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=4,
        temperature=0,
        extra_body=extra or None,
    )


def test_ingest_keeps_the_index_in_step_with_the_store(tmp_path: Path, tiny_base: Path):
    home = create_home(tmp_path / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    policy = home.inbox / "policy.md"
    policy.write_text("Visiting hours end at 11:00 on every ward.\n")
    (home.inbox / "chat.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    )
    ingest(home)
    with Index(home.passage_index) as index:
        assert [d.path for d in index.documents()] == ["policy.md"]  # conversations are not sources
        assert "11:00" in index.search("when do visiting hours end")[0].text
    time.sleep(0.01)
    policy.write_text("Visiting hours end at 10:00 on every ward.\n")  # the policy rewritten
    report = ingest(home)
    assert report.indexed == 1
    with Index(home.passage_index) as index:
        hits = index.search("when do visiting hours end")
        assert [h.text for h in hits] == ["Visiting hours end at 10:00 on every ward."]  # the old one is gone
    # a second sync with nothing changed touches nothing
    assert passages.sync(home).added == [] and passages.sync(home).removed == []


def test_a_grounded_answer_returns_its_sources(grounded):
    client = grounded["clients"]["admin"]
    answer = ask(client, "How much does a lost staff badge cost to replace?")
    sources = answer.model_extra["sources"]
    assert sources and sources[0]["document"] == "handbook.md" and "$18" in sources[0]["passage"]
    assert [s["id"] for s in sources] == list(range(1, len(sources) + 1))
    assert all(len(s["sha256"]) == 64 and s["score"] > 0 for s in sources)
    assert answer.model_extra["grounding"] == {
        "used": True,
        "reason": None,
        "collection": "shared",
        "retrieval": "bm25",
    }
    alone = ask(client, "How much does a lost staff badge cost to replace?", grounding=False)
    assert alone.model_extra["sources"] == []
    assert alone.model_extra["grounding"]["used"] is False
    assert "model alone" in alone.model_extra["grounding"]["reason"]
    # the passages reached the model: the grounded prompt is longer by them
    assert answer.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_the_streamed_answer_carries_the_sources_on_its_last_chunk(grounded):
    client = grounded["clients"]["admin"]
    chunks = list(
        client.chat.completions.create(
            model="appliance",
            messages=[{"role": "user", "content": "On what day of the month are salaries paid?"}],
            max_tokens=4,
            temperature=0,
            stream=True,
        )
    )
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    sources = final[0].model_extra["sources"]
    assert sources and "26th" in sources[0]["passage"]
    assert all("sources" not in (c.model_extra or {}) for c in chunks if c is not final[0])


def test_retrieval_never_crosses_a_collection_wall(grounded):
    cardio, admin = grounded["clients"]["cardio"], grounded["clients"]["admin"]
    answer = ask(cardio, "When do visiting hours end?", model=f"appliance/{CARDIO}")
    passages_seen = " ".join(s["passage"] for s in answer.model_extra["sources"])
    assert "20:00" in passages_seen and "16:00" not in passages_seen and "marigold" not in passages_seen
    assert answer.model_extra["grounding"]["collection"] == CARDIO
    # the other collection's canary is not found even when asked for by name
    answer = ask(admin, "What is the canary word marigold-9275?", model=f"appliance/{CARDIO}")
    assert all("marigold" not in s["passage"] for s in answer.model_extra["sources"])
    # the shared collection's answers use the shared documents only
    answer = ask(admin, "When do visiting hours end?")
    assert all(s["document"] == "handbook.md" for s in answer.model_extra["sources"])
    with pytest.raises(openai.NotFoundError):  # a collection the key may not see does not exist
        ask(cardio, "When do visiting hours end?", model=f"appliance/{LEGAL}")


def test_hostile_questions_never_break_retrieval(grounded):
    client = grounded["clients"]["admin"]
    for question in HOSTILE:
        answer = ask(client, question)
        assert isinstance(answer.model_extra["sources"], list), question
    big = "badge " * 150_000  # ~0.9 MB: within the body limit, cut down for retrieval
    reply = httpx.post(
        grounded["server"].url + "/v1/chat/completions",
        json={"model": "appliance", "messages": [{"role": "user", "content": big}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {grounded['secrets']['admin']}"},
        timeout=120,
    )
    assert reply.status_code in (200, 400), reply.text  # answered, or refused as too long for the context
    reply = httpx.post(
        grounded["server"].url + "/v1/chat/completions",
        json={"model": "appliance", "messages": [{"role": "user", "content": "x"}], "grounding": "no"},
        headers={"Authorization": f"Bearer {grounded['secrets']['admin']}"},
        timeout=30,
    )
    assert reply.status_code == 400 and "grounding" in reply.json()["error"]["message"]


def test_a_pinned_version_and_a_tool_request_answer_alone(grounded):
    client = grounded["clients"]["admin"]
    pinned = ask(client, "How much does a lost badge cost?", model=f"appliance/{CARDIO}@v1")
    assert "sources" not in (pinned.model_extra or {})
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    answer = client.chat.completions.create(
        model="appliance",
        messages=[{"role": "user", "content": "How much does a lost badge cost?"}],
        max_tokens=4,
        tools=tools,
    )
    assert answer.model_extra["sources"] == [] and "tools" in answer.model_extra["grounding"]["reason"]


def test_the_log_line_counts_sources_and_never_shows_them(grounded, caplog):
    with caplog.at_level(logging.INFO, logger="appliance.serve"):
        ask(grounded["clients"]["admin"], "How much does a lost staff badge cost to replace?")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert lines and "sources=" in lines[-1]
    assert not any("$18" in r.getMessage() or "Security Office" in r.getMessage() for r in caplog.records)


def test_grounding_off_for_a_collection(grounded, tmp_path: Path):
    home: Home = grounded["home"]
    settings = load(home.config)
    settings.collections[CARDIO] = settings.collection(CARDIO).model_copy(update={"grounding": "off"})
    server = Server(home, settings, port=free_port()).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=grounded["secrets"]["admin"], max_retries=0)
        off = ask(client, "When do visiting hours end?", model=f"appliance/{CARDIO}")
        on = ask(client, "How much does a lost badge cost?")
    finally:
        server.stop()
    assert off.model_extra["sources"] == [] and "off" in off.model_extra["grounding"]["reason"]
    assert on.model_extra["sources"]


def test_a_corrupt_index_is_rebuilt_and_answers_go_on(grounded):
    home: Home = grounded["home"]
    client = grounded["clients"]["admin"]
    home.passage_index.write_bytes(b"this is not a database" * 100)
    for sidecar in ("-wal", "-shm"):
        home.passage_index.with_name(home.passage_index.name + sidecar).unlink(missing_ok=True)
    answer = ask(client, "How much does a lost staff badge cost to replace?")
    assert answer.choices and answer.model_extra["sources"] == []
    assert "rebuilt" in answer.model_extra["grounding"]["reason"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = ask(client, "How much does a lost staff badge cost to replace?")
        if answer.model_extra["sources"]:
            break
        time.sleep(0.2)
    assert "$18" in answer.model_extra["sources"][0]["passage"]


def test_forget_removes_a_documents_passages_in_the_same_step(grounded):
    home: Home = grounded["home"]
    scope = home.scoped(LEGAL)
    client = grounded["clients"]["admin"]
    before = ask(client, "What is the canary word marigold-9275?", model=f"appliance/{LEGAL}")
    assert any("marigold-9275" in s["passage"] for s in before.model_extra["sources"])
    report = forget(scope, "legal/visiting.md", queue=False)
    assert report["passages_removed"] == 2  # its two sentences
    with Index(scope.passage_index) as index:
        assert index.search("marigold-9275") == [] and index.count()["documents"] == 0
    assert b"marigold" not in scope.passage_index.read_bytes()  # not even in a free page
    after = ask(client, "What is the canary word marigold-9275?", model=f"appliance/{LEGAL}")
    assert after.model_extra["sources"] == []
    assert after.model_extra["grounding"]["reason"] == "the collection holds no documents"


def test_the_prompt_format_and_citations():
    sources = [Source(1, "a.md", "0" * 64, "Badges cost $18.", 2.0), Source(2, "b.md", "1" * 64, "Pay day.", 1.0)]
    messages = grounded_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Badge?"}], sources
    )
    assert messages[0]["content"].startswith("Be brief.\n\nAnswer from the numbered passages")
    assert "[1] (a.md) Badges cost $18." in messages[0]["content"] and messages[1]["content"] == "Badge?"
    assert grounded_messages([{"role": "user", "content": "x"}], [])[0]["content"].endswith("The documents do not say.")
    assert cited("It costs $18 [1], see also [2] and [1] and [7].", sources) == sources


def test_config_round_trip_keeps_grounding(tmp_path: Path):
    settings = tiny_settings()
    settings.grounding.mode = "off"
    settings.collections[CARDIO] = settings.collection(CARDIO).model_copy(update={"grounding": "auto"})
    path = tmp_path / "config.toml"
    path.write_text(dump(settings))
    again = load(path)
    assert again.grounding.mode == "off" and again.collection(CARDIO).grounding == "auto"


def studied_handbook() -> tuple[str, Any, Any]:
    """The team's handbook, its study material (model-free, fixed seed) and its DocumentStudy."""
    from appliance.data.study import study_document
    from appliance.data.study.stage import DocumentStudy

    text = (REPO / "examples" / "handbook" / "handbook.md").read_text()
    material = study_document(text, "a" * 64, count_tokens=lambda t: len(t.split()), seed=0, max_tokens=200)
    doc = DocumentStudy(
        "a" * 64,
        "handbook.md",
        "text",
        statements=[s.text for s in material.statements],
        conversations=material.conversations,
        heldout=material.heldout,
    )
    return text, material, doc


def shown_passages(conversation: dict) -> list[str]:
    """The passages a grounded conversation's system message shows, in their numbered order."""
    lines = conversation["messages"][0]["content"].split("\n")
    return [line.split(") ", 1)[1] for line in lines if re.match(r"\[\d+\] \(", line)]


def test_raft_conversations_cite_the_answering_passage(tmp_path: Path):
    from appliance.data.grounded import DOES_NOT_SAY
    from appliance.data.study import raft

    text, material, doc = studied_handbook()
    other = raft.Document("b" * 64, "wards.md", "Ward 7 is the cardiology ward. Its sister is Ada Moss.")
    with raft.Retrieval([raft.Document(doc.sha256, doc.path, text), other], tmp_path, k=3) as retrieval:
        made = raft.conversations(retrieval, [doc], seed=0, shares=raft.Shares(none=0.2, unanswerable=0.2, memory=0.2))
        by_default = raft.conversations(retrieval, [doc], seed=0)
        twice = raft.conversations(retrieval, [doc], seed=0, shares=raft.Shares(questions=2))
        heldout = {doc.sha256: {"path": doc.path, "facts": 1, "questions": [dict(q) for q in material.heldout[:5]]}}
        raft.open_book(retrieval, heldout)
    asked = {c["messages"][0]["content"] for c in doc.conversations}
    facts = [c for _, c in made if c["messages"][1]["content"] in asked]
    made_up = [c for _, c in made if c["messages"][1]["content"] not in asked]
    assert len(facts) >= len(doc.statements) * 0.9  # about one per fact
    assert 0.1 < len(made_up) / len(facts) < 0.3  # unanswerable share, never a fact's own question
    assert all(c["messages"][-1]["content"] == DOES_NOT_SAY for c in made_up)
    declined = from_memory = 0
    for conversation in facts:
        system, user, answer = conversation["messages"]
        assert system["role"] == "system" and system["content"].startswith("Answer from the numbered passages")
        assert user["role"] == "user" and answer["role"] == "assistant"
        shown = system["content"].count("\n[")
        assert 1 <= shown <= 3
        if answer["content"] == DOES_NOT_SAY:
            declined += 1
            continue
        if not answer["content"].endswith("]"):  # asked without its passage, answered from memory, uncited
            from_memory += 1
            assert answer["content"] not in system["content"]
            continue
        n = int(answer["content"].rsplit("[", 1)[1].rstrip("]"))
        assert 1 <= n <= shown
        passage = system["content"].split(f"\n[{n}] ", 1)[1].split("\n[", 1)[0]
        words = set(answer["content"].lower().split()) & set(passage.lower().split())
        assert len(words) >= 3, (answer, passage)  # the cited passage is the one the answer restates
    assert 0.1 < declined / len(facts) < 0.3 and 0.1 < from_memory / len(facts) < 0.3
    answered = [c for _, c in by_default if c["messages"][-1]["content"] != DOES_NOT_SAY]
    assert all(c["messages"][-1]["content"].endswith("]") for c in answered)  # memory answers are off by default
    assert all(q["sources"] for q in heldout[doc.sha256]["questions"])
    twice_asked = [c["messages"][1]["content"] for _, c in twice if c["messages"][1]["content"] in asked]
    assert len(twice_asked) >= 1.8 * len(doc.statements)  # two questions per fact ...
    assert len(set(twice_asked)) == len(twice_asked)  # ... each a different one


def test_shuffled_raft_passages_put_the_answering_one_anywhere(tmp_path: Path):
    """In retrieval order a study question's passage is nearly always [1], which teaches the
    model to answer from [1]; shuffled, it is cited from every place, and still the right one."""
    import collections

    from appliance.data.study import raft

    text, _, doc = studied_handbook()

    def cited_places(shuffled: bool) -> collections.Counter[int]:
        shares = raft.Shares(none=0.0, unanswerable=0.0, shuffled=shuffled)
        with raft.Retrieval([raft.Document(doc.sha256, doc.path, text)], tmp_path, k=3) as retrieval:
            made = raft.conversations(retrieval, [doc], seed=0, shares=shares)
        places: collections.Counter[int] = collections.Counter()
        for _, conversation in made:
            answer = conversation["messages"][-1]["content"]
            n = int(answer.rsplit("[", 1)[1].rstrip("]"))
            passage = shown_passages(conversation)[n - 1]
            words = set(re.findall(r"\w+", answer.rsplit(" [", 1)[0].lower()))
            assert len(words & set(re.findall(r"\w+", passage.lower()))) >= len(words) // 2, (answer, passage)
            places[n] += 1
        return places

    in_order, shuffled = cited_places(False), cited_places(True)
    assert in_order[1] > 0.8 * sum(in_order.values())
    assert all(shuffled[n] > 0.2 * sum(shuffled.values()) for n in (1, 2, 3)), shuffled


def test_counterfactual_raft_answers_can_only_be_read_from_their_passage(tmp_path: Path):
    """A share of cited answers has one key value changed in its passage and its answer alike,
    so the model learns to read the passage instead of answering from memory."""
    import difflib
    import random

    from appliance.data.study import raft

    text, _, doc = studied_handbook()
    with raft.Retrieval([raft.Document(doc.sha256, doc.path, text)], tmp_path, k=3) as retrieval:
        originals = [p for passages in retrieval.passages.values() for p in passages]
        made = raft.conversations(retrieval, [doc], seed=0, shares=raft.Shares(none=0.0, unanswerable=0.0, swapped=1.0))
        plain = raft.conversations(retrieval, [doc], seed=0, shares=raft.Shares(none=0.0, unanswerable=0.0))

    def words(t: str) -> set[str]:
        return set(re.findall(r"[\w:]+", t))

    changed = 0
    for _, conversation in made:
        answer = conversation["messages"][-1]["content"]
        cited = shown_passages(conversation)[int(answer.rsplit("[", 1)[1].rstrip("]")) - 1]
        if cited in originals:
            continue
        changed += 1
        assert conversation.get("counterfactual") is True  # counted as such in train.json
        original = max(originals, key=lambda p: difflib.SequenceMatcher(None, p, cited).ratio())
        new, old = words(cited) - words(original), words(original) - words(cited)
        stated = words(answer.rsplit(" [", 1)[0])
        assert new and new <= stated and not old & stated, (answer, cited)  # as the passage now says
    assert 0.3 < changed / len(made) < 0.9  # the facts with a number the question does not give
    assert all(p in originals for _, c in plain for p in shown_passages(c))  # off unless asked for

    rng = random.Random(0)
    for _ in range(50):
        night = "The night shift starts at 19:15."
        changed_night = raft.counterfactual(night, "When does the night shift start?", night, night, rng)
        assert changed_night and changed_night[0] == changed_night[1]
        hour, minute = changed_night[0].rsplit(" ", 1)[1].rstrip(".").split(":")
        assert 10 <= int(hour) <= 23 and 0 <= int(minute) <= 59 and (hour, minute) != ("19", "15")
        beds = "The ward has 212 beds."
        home = "Welcome to Ward 7. The ward has 212 beds. The desk is on extension 2300."
        passage, answer = raft.counterfactual(beds, "How many beds?", home, "It has 212 beds.", rng) or ("", "")
        number = re.fullmatch(
            r"Welcome to Ward 7\. The ward has ([1-9]\d\d) beds\. The desk is on extension 2300\.", passage
        )
        assert number and number[1] != "212" and answer == f"It has {number[1]} beds."
    # a value the question gives is not changed, nor one without digits
    assert raft.counterfactual(night, "Does it start at 19:15?", night, night, rng) is None
    assert (
        raft.counterfactual("Ada Moss leads Ward Seven.", "Who leads?", "Ada Moss leads Ward Seven.", "Ada Moss.", rng)
        is None
    )


def test_unanswerable_questions_are_not_answered_by_their_statements():
    import random

    from appliance.data.study import unanswerable

    statements = [
        "The day shift starts at 07:15.",
        "The night shift starts at 19:15.",
        "The main pharmacy closes at 19:45.",
        "The staff restaurant is on Level 3.",
        "The switchboard is reached on extension 2300.",
        "Dr. Ada Moss leads the audit on Ward 7.",
        "Lockers are assigned by Ines Marlowe.",
    ]
    made = unanswerable.questions(statements, 100, random.Random(0))
    low = [q.lower() for q in made]
    assert any("night shift" in q and "close" in q for q in low)  # a subject with another's predicate
    assert any("restaurant" in q and "close" in q for q in low)
    assert not any("night shift" in q and "start" in q for q in low)  # stated: that pair is answerable
    assert not any("day shift" in q and "start" in q for q in low)
    assert not any("moss" in q for q in low)  # a person is never given a thing's predicate, nor the reverse
    assert not any(q.startswith("who") and "pharmacy" in q for q in low)
    assert not any(q.startswith("lockers") or " lockers " in q for q in low)  # not a definite subject
    assert all(q.endswith("?") for q in made) and len(set(low)) == len(low)
    assert unanswerable.questions(statements, 100, random.Random(0)) == made  # the same seed, the same questions
    assert len(unanswerable.questions(statements, 2, random.Random(0))) == 2


def hybrid_home(root: Path, tiny_base: Path, embedding_model: Path | None) -> Home:
    """A home whose base answers, one document indexed, and an embedding model configured
    (None: the shipped word vectors instead)."""
    home = create_home(root / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    (home.inbox / "pay.md").write_text(
        "Salaries are paid on the 26th of each month. Business mileage is reimbursed at $0.58 per mile.\n"
    )
    ingest(home)
    registry.add(home, "base", convert(tiny_base, root / "base.gguf"), {"quant": "F16"})
    registry.promote(home, "base")
    settings = load(home.config)
    settings.grounding.embedding_model = str(embedding_model) if embedding_model else None
    settings.grounding.word_vectors = embedding_model is None
    home.config.write_text(dump(settings))
    return home


WAGES = "When will my wages arrive?"  # no word in common with pay.md


@contextmanager
def endpoint(home: Home) -> Iterator[openai.OpenAI]:
    """The real server on ``home``, and an ``openai`` client of it."""
    server = Server(home, load(home.config), port=free_port()).start()
    try:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=read_api_key(home), max_retries=0, timeout=120)
    finally:
        server.stop()


def grounded_until_dense(client: openai.OpenAI, question: str) -> Any:
    """The reply once the passages' vectors, made in the background after the first question, are in."""
    deadline = time.monotonic() + 180
    while True:
        reply = ask(client, question)
        if reply.model_extra["grounding"].get("retrieval") == "bm25+dense" or time.monotonic() > deadline:
            return reply
        time.sleep(0.5)


def asked_in_other_words(home: Home, client: openai.OpenAI) -> Any:
    """The reply to WAGES, which BM25 alone cannot answer, once dense retrieval has found pay.md."""
    with Index(home.passage_index) as index:
        assert index.search(WAGES) == []
    reply = grounded_until_dense(client, WAGES)
    assert reply.model_extra["grounding"]["retrieval"] == "bm25+dense"
    assert reply.model_extra["sources"][0]["document"] == "pay.md"
    return reply


def vector_models(home: Home) -> set[str]:
    """The models whose vectors the home's index holds (checked: every passage has one from each)."""
    with Index(home.passage_index) as index:
        models = {m for (m,) in index.db.execute("SELECT DISTINCT model FROM vectors")}
        assert all(index.unembedded(m, 10) == [] for m in models)
    return models


def test_the_shipped_word_vectors_find_a_passage_asked_in_other_words(tmp_path: Path, tiny_base: Path):
    """A fresh home's default: no embedding GGUF, yet a question that shares no word with the
    document finds its passage, through the word vectors shipped with the appliance."""
    assert Settings().grounding.word_vectors and Settings().grounding.embedding_model is None
    home = hybrid_home(tmp_path, tiny_base, None)
    (home.inbox / "parking.md").write_text("Staff parking permits are issued by the estates office in Block C.\n")
    ingest(home)
    with endpoint(home) as client:
        asked_in_other_words(home, client)
    assert vector_models(home) == {wordvectors.identity()}


def test_word_vectors_off_leaves_bm25_alone(tmp_path: Path, tiny_base: Path):
    home = hybrid_home(tmp_path, tiny_base, None)
    settings = load(home.config)
    settings.grounding.word_vectors = False
    home.config.write_text(dump(settings))
    with endpoint(home) as client:
        replies = [ask(client, q) for q in (WAGES, "When are salaries paid?")]
    assert [r.model_extra["grounding"]["retrieval"] for r in replies] == ["bm25", "bm25"]
    assert replies[0].model_extra["sources"] == []  # BM25 has no word to find it by
    with Index(home.passage_index) as index:
        assert index.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == 0


def test_hybrid_retrieval_finds_a_passage_asked_in_other_words(tmp_path: Path, tiny_base: Path):
    """With an embedding model configured, a question sharing no word with the document (BM25
    finds nothing) still gets the nearest passage, fused with BM25 by reciprocal rank."""
    from appliance.training.basemodel import embedded_gguf

    home = hybrid_home(tmp_path, tiny_base, embedded_gguf())
    with endpoint(home) as client:
        reply = asked_in_other_words(home, client)
        assert {s["document"] for s in reply.model_extra["sources"]} == {"pay.md"}  # its two sentences at most
        assert len(vector_models(home)) == 1  # every passage has its vector, from one model
        plain = ask(client, "When are salaries paid?")  # both rankings agree on the passage
        assert plain.model_extra["sources"][0]["passage"].startswith("Salaries are paid")


def test_a_broken_embedding_model_leaves_bm25_alone_with_one_log_line(
    tmp_path: Path, tiny_base: Path, caplog: pytest.LogCaptureFixture
):
    broken = tmp_path / "broken-embed.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    home = hybrid_home(tmp_path, tiny_base, broken)
    server = Server(home, load(home.config), port=free_port()).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=read_api_key(home), max_retries=0, timeout=120)
        with caplog.at_level(logging.WARNING, logger="appliance.serve"):
            replies = [ask(client, "When are salaries paid?") for _ in range(3)]
    finally:
        server.stop()
    for reply in replies:
        assert reply.model_extra["grounding"]["retrieval"] == "bm25"
        assert reply.model_extra["sources"][0]["passage"].startswith("Salaries are paid")
    lines = [r for r in caplog.records if "embedding model" in r.getMessage() and "BM25 alone" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]


def test_raft_retrieves_what_the_endpoint_retrieves_with_word_vectors(tmp_path: Path, tiny_base: Path):
    """The model is trained on the passages the endpoint will give it: with the shipped word
    vectors on, RAFT's retrieval and the endpoint's return the same passages, and a question in
    other words than the document's finds its passage in both (BM25 alone finds none)."""
    from appliance.data.study import raft
    from appliance.serving.grounding import Retriever

    home = hybrid_home(tmp_path, tiny_base, None)
    parking = "Staff parking permits are issued by the estates office in Block C.\n"
    (home.inbox / "parking.md").write_text(parking)
    ingest(home)
    pay = (home.inbox / "pay.md").read_text()
    documents = [
        raft.Document(hashlib.sha256(t.encode()).hexdigest(), n, t)
        for n, t in (("pay.md", pay), ("parking.md", parking))
    ]
    questions = [WAGES, "Where do I get a permit for my car?", "How much is mileage reimbursed?"]
    retriever = Retriever(home, load(home.config))
    deadline = time.monotonic() + 60
    while (served := retriever.retrieve("", [{"role": "user", "content": WAGES}])).retrieval != "bm25+dense":
        assert time.monotonic() < deadline, "the passages' vectors were never made"
        time.sleep(0.2)
    with (
        raft.Retrieval(documents, tmp_path, k=3, word_vectors=True) as hybrid,
        raft.Retrieval(documents, tmp_path, k=3) as bm25,
    ):
        assert bm25.sources(WAGES) == []
        assert hybrid.sources(WAGES)[0].passage.startswith("Salaries are paid")
        for question in questions:
            served = retriever.retrieve("", [{"role": "user", "content": question}])
            assert [s.passage for s in hybrid.sources(question)] == [s.passage for s in served.sources], question
