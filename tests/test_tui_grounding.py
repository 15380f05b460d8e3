"""Grounded answers in the terminal app (issue 18): the sources and grounding status the endpoint
sends with an answer, read from its SSE stream, shown under the answer, opened in full, and the
switch that asks the model alone instead; the passage index's size on the Data screen.

The endpoint here is a small Starlette app on a loopback port speaking the wire format of issue 18
(canned answers). The real server's grounding is being built at the same time as this screen, so
these tests pin the format, not the server; test_tui_real.py drives the real endpoint.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from conftest import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from test_tui import ScriptedEngine, settle, text_of
from textual.widgets import DataTable, Switch

from tui.app import make_app
from tui.endpoint import Answer, Grounding, Source, sse_text, stream_chat
from tui.screens.chat import AnswerPane, SourceScreen, excerpt, grounding_words
from tui.screens.data import index_words

SIZE = (80, 24)
KEY = "test-key"
pytestmark = pytest.mark.anyio

HANDBOOK = (
    "Night shifts start at 19:00. The handover takes fifteen minutes and happens at the nurses' "
    "station; the outgoing nurse reads every patient's chart aloud."
)
SOURCES = [
    {"id": 1, "document": "handbook.md", "sha256": "a1" * 32, "passage": HANDBOOK, "score": 7.31},
    {
        "id": 2,
        "document": "rota.pdf",
        "sha256": "b2" * 32,
        "passage": "Weekend rota: two nurses per ward.",
        "score": 3.5,
    },
]
GROUNDED = {"used": True, "reason": None, "collection": "shared"}
ALONE = {"used": False, "reason": "the request asked for the model alone", "collection": "shared"}


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


def chunk(delta: dict[str, Any], finish: str | None = None, **top: Any) -> str:
    """One SSE line as the endpoint writes it (a chat.completion.chunk)."""
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "appliance",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **top,
    }
    return f"data: {json.dumps(body)}"


def stream_lines(words: list[str], sources: list[dict[str, Any]], grounding: dict[str, Any]) -> Iterator[str]:
    yield chunk({"role": "assistant", "content": ""})
    for w in words:
        yield chunk({"content": w})
        yield ""  # SSE separates events with blank lines
    yield chunk({}, "stop", sources=sources, grounding=grounding)
    yield "data: [DONE]"


# --- reading the stream ------------------------------------------------------------------------


def test_sse_text_yields_the_same_pieces_and_the_answer_gets_the_sources():
    words = ["Handover ", "is at ", "19:00 [1]."]
    plain = list(sse_text(stream_lines(words, SOURCES, GROUNDED)))
    answer = Answer()
    pieces = list(sse_text(stream_lines(words, SOURCES, GROUNDED), answer))
    assert pieces == plain == words
    assert answer.text == "Handover is at 19:00 [1]."
    assert answer.sources[0] == Source(1, "handbook.md", "a1" * 32, HANDBOOK, 7.31)
    assert [s.id for s in answer.sources] == [1, 2] and answer.sources[1].score == 3.5
    assert answer.grounding == Grounding(True, None, "shared")


def test_an_ungrounded_answer_says_why_and_cites_nothing():
    answer = Answer()
    list(sse_text(stream_lines(["Hello."], [], ALONE), answer))
    assert answer.sources == [] and answer.grounding == Grounding(False, ALONE["reason"], "shared")
    assert grounding_words(answer) == "answered from the model alone: the request asked for the model alone"
    assert grounding_words(Answer(grounding=Grounding(False))) == "answered from the model alone"


def test_an_endpoint_without_grounding_leaves_the_answer_plain():
    """An older endpoint sends no sources and no grounding: nothing to show, nothing claimed."""
    lines = [chunk({"content": "Hi"}), chunk({}, "stop"), "data: [DONE]"]
    answer = Answer()
    assert list(sse_text(iter(lines), answer)) == ["Hi"]
    assert answer.sources == [] and answer.grounding is None and grounding_words(answer) == ""


def test_malformed_sources_are_skipped_and_missing_numbers_follow_the_order():
    answer = Answer()
    answer.take({"sources": ["junk", {"document": "a.md", "passage": "p", "score": "high"}, None]})
    assert answer.sources == [Source(2, "a.md", "", "p", None)]


def test_a_whole_chat_completion_carries_the_same_fields():
    """The non-streamed response: the same top-level fields on the chat.completion object."""
    body = {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "At 19:00 [1]."}, "finish_reason": "stop"}
        ],
        "sources": SOURCES[:1],
        "grounding": GROUNDED,
    }
    answer = Answer()
    answer.take(body)
    assert [s.document for s in answer.sources] == ["handbook.md"] and answer.grounding is not None


def test_an_excerpt_is_one_line_cut_with_an_ellipsis():
    assert excerpt("a\n\n  b\tc") == "a b c"
    cut = excerpt(HANDBOOK, 30)
    assert len(cut) <= 30 and cut.endswith("…") and "\n" not in cut


# --- the endpoint over HTTP --------------------------------------------------------------------


def grounded_app(requests: list[dict[str, Any]]) -> Starlette:
    """Canned answers in issue 18's wire format; every request body is recorded."""

    async def chat(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "missing or wrong API key"}}, status_code=401)
        body = await request.json()
        requests.append(body)
        alone = body.get("grounding") is False
        words = ["The model alone says hi."] if alone else ["Handover ", "is at ", "19:00 [1]."]
        lines = list(stream_lines(words, [] if alone else SOURCES, ALONE if alone else GROUNDED))

        async def stream():
            for line in filter(None, lines):
                yield line + "\n\n"
                await asyncio.sleep(0.005)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(_: Request):
        return JSONResponse({"status": "ok", "model": "v1"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])


@pytest.fixture()
def grounded_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    requests: list[dict[str, Any]] = []
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(grounded_app(requests), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", requests
    server.should_exit = True
    thread.join(5)


def test_stream_chat_asks_for_the_model_alone_only_when_told(grounded_server):
    url, requests = grounded_server
    question = [{"role": "user", "content": "when is handover?"}]
    answer = Answer()
    assert "".join(stream_chat(url, KEY, question, "appliance", answer=answer)) == "Handover is at 19:00 [1]."
    assert "grounding" not in requests[-1]  # the default is the endpoint's: grounded when it has documents
    assert [s.document for s in answer.sources] == ["handbook.md", "rota.pdf"]
    alone = Answer()
    assert list(stream_chat(url, KEY, question, "appliance", grounding=False, answer=alone))
    assert requests[-1]["grounding"] is False and alone.grounding is not None and not alone.grounding.used


# --- the chat screen ---------------------------------------------------------------------------


@pytest.fixture()
def engine(tmp_path: Path) -> ScriptedEngine:
    (tmp_path / "api_key").write_text(f"{KEY}\n")
    return ScriptedEngine(tmp_path)


def source_rows(app, pane: str = "#left") -> list[tuple[str, ...]]:
    table = app.screen.query_one(f"{pane} .sources", DataTable)
    return [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)] if table.display else []


async def test_chat_shows_sources_opens_a_passage_and_asks_the_model_alone(engine, grounded_server):
    engine.endpoint, requests = grounded_server
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await pilot.press("c")
        chat = app.screen
        await settle(pilot, app, lambda: chat.focused is not None and chat.focused.id == "question")
        assert chat.query_one("#grounding", Switch).value  # grounded unless turned off
        await pilot.press(*"when is handover", "enter")
        await settle(pilot, app, lambda: "left" in chat.answers)
        assert chat.answers["left"] == "Handover is at 19:00 [1]." and "grounding" not in requests[-1]
        rows = source_rows(app)
        assert [r[:2] for r in rows] == [("1", "handbook.md"), ("2", "rota.pdf")]
        assert rows[0][2] == "7.31"
        assert rows[0][3].startswith("Night shifts start at 19:00") and rows[0][3].endswith("…")
        assert not chat.query_one("#left .grounding").display  # grounded: its sources say so
        assert "handbook.md" in app.export_screenshot()  # visible at 80x24

        await pilot.press("escape", "o")  # out of the question box (where o is typed), open the chosen source
        await settle(pilot, app, lambda: isinstance(app.screen, SourceScreen))
        assert text_of(app, "#passage") == HANDBOOK  # the whole passage, not the excerpt
        await pilot.press("escape")
        await settle(pilot, app, lambda: app.screen is chat)

        chat.query_one("#left .sources", DataTable).focus()  # enter on a row opens that row's source
        await pilot.press("down", "enter")
        await settle(pilot, app, lambda: isinstance(app.screen, SourceScreen))
        assert app.screen.source.document == "rota.pdf"
        await pilot.press("escape")
        await settle(pilot, app, lambda: app.screen is chat)

        chat.query_one("#question").focus()
        await pilot.press("ctrl+g")  # works from inside the question box
        assert not chat.query_one("#grounding", Switch).value
        await pilot.press(*"hi", "enter")
        await settle(pilot, app, lambda: chat.answers.get("left") == "The model alone says hi.")
        assert requests[-1]["grounding"] is False
        assert source_rows(app) == []  # the earlier answer's sources are gone with it
        note = chat.query_one("#left .grounding")
        assert note.display and text_of(app, "#left .grounding") == (
            "answered from the model alone: the request asked for the model alone"
        )
        await pilot.press("escape", "o")  # nothing to open: said so, no dialog
        await settle(pilot, app, lambda: any("cites no sources" in n.message for n in app._notifications))
        assert app.screen is chat


async def test_compare_shows_each_answers_own_sources(engine, grounded_server):
    engine.endpoint, _ = grounded_server
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await pilot.press("c")
        chat = app.screen
        await settle(pilot, app, lambda: chat.focused is not None and chat.focused.id == "question")
        await pilot.press("ctrl+o", *"when", "enter")
        await settle(pilot, app, lambda: "left" in chat.answers and "right" in chat.answers)
        assert len(source_rows(app, "#left")) == len(source_rows(app, "#right")) == 2
        right = chat.query_one("#right", AnswerPane)
        right.query_one(DataTable).focus()
        await pilot.press("o")  # the focused pane's source, not the left one's
        await settle(pilot, app, lambda: isinstance(app.screen, SourceScreen))
        assert app.screen.source == right.answer.sources[0]


# --- the Data screen ---------------------------------------------------------------------------


class IndexedEngine(ScriptedEngine):
    """The scripted engine, its collection listing the passage index (``index``; None: none yet)."""

    index: dict[str, int] | None = {"documents": 3, "passages": 41}

    def collections(self) -> list[dict[str, Any]]:
        return [{**c, "index": self.index} for c in super().collections()]


async def test_data_screen_shows_the_passage_index(tmp_path):
    engine = IndexedEngine(tmp_path)
    app = make_app(engine, poll_seconds=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("i")
        await settle(pilot, app, lambda: "41 passage(s)" in text_of(app, "#index"))
        assert text_of(app, "#index").startswith("Passage index: 3 document(s), 41 passage(s)")
        assert "Passage index: 3 document(s)" in app.export_screenshot().replace("&#160;", " ")
        engine.index = None
        await settle(pilot, app, lambda: "none yet" in text_of(app, "#index"))


def test_index_words_say_nothing_for_an_engine_that_reports_no_index():
    assert index_words(None) == "" and index_words({"name": ""}) == ""
    assert "none yet" in index_words({"index": None})
