"""The terminal app driven by Textual's Pilot against a scripted engine.

The scripted engine is a plain class implementing ``appliance.contract.api.Engine`` with canned
state the test changes and a record of the calls made: it stands for the engine (the
real one is driven in test_tui_real.py). Chat streams over real HTTP from a small
Starlette server speaking the endpoint's SSE format on a loopback port.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from conftest import free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from textual.widgets import DataTable, Static

from appliance.contract.api import Document, ModelVersion, QuarantinedFile, Status
from appliance.contract.errors import AccessError, RegistryError
from appliance.contract.events import Emit, Message, Progress, StageFinished, StageStarted, ignore
from appliance.contract.names import read_api_key
from tui.app import DARK, LIGHT, make_app
from tui.client import Client
from tui.widgets import ConfirmScreen

SIZE = (80, 24)
pytestmark = pytest.mark.anyio


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


def version(name: str, created: float, current: bool = False) -> ModelVersion:
    return ModelVersion(name, created, "Q4_K_M", 105_000_000, "ab" * 32, f"run-{name}", f"snap-{name}", current)


class ScriptedEngine:
    """The whole Protocol, with canned state each test sets and a record of the calls made."""

    def __init__(self, home: Path, endpoint: str = "http://127.0.0.1:9/v1"):
        self.home = home
        self.collection = ""
        self.endpoint = endpoint
        self.calls: list[tuple[Any, ...]] = []
        self.versions = [
            version("base", 1_700_000_000),
            version("v1", 1_700_100_000, current=True),
            version("v2", 1_700_200_000),
        ]
        self.fail_promote: Exception | None = None
        self.ingest_report: dict[str, Any] = {
            "accepted": 4,
            "files": 2,
            "duplicates": 0,
            "quarantined": [
                {"file": "scan.pdf", "reasons": ["the PDF has no text layer (a scanned image); export it with text"]}
            ],
        }
        self.documents = [
            Document("policies.jsonl", "aa" * 32, "jsonl", 40, learned=True),
            Document("facts.md", "bb" * 32, "md", 9, learned=True, facts=30, questions=210, recall=0.9),
        ]
        self.quarantine: list[QuarantinedFile] = []
        self.job: dict[str, Any] | None = None
        self.log: list[dict[str, Any]] = []  # the daemon's event log, as JSON objects
        self.audit: list[dict[str, Any]] = [
            {"seq": 1, "at": 1_700_100_000, "user": "ana", "action": "promote", "details": {"version": "v1"}}
        ]
        self.reports: dict[str, dict[str, Any]] = {
            "run-v1": {
                "passed": True,
                "checks": [
                    {"name": "validation_loss", "passed": True, "value": {"candidate": 1.91, "current": 2.05}},
                    {"name": "general_probes", "passed": True, "value": {"candidate": 4, "current": 4, "questions": 5}},
                    {"name": "new_data", "passed": None, "detail": "not required"},
                ],
                "metrics": {
                    "candidate": {"exact_match": 0.3, "token_f1": 0.52, "rouge_l": 0.48, "bleu": 21.04},
                    "current": {"exact_match": 0.1, "token_f1": 0.2, "rouge_l": 0.25, "bleu": 8.0},
                    "sample": [
                        {
                            "question": "Which extension reaches the pharmacist?",
                            "reference": "4417.",
                            "candidate": "Extension 4417.",
                            "current": "I do not know.",
                        }
                    ],
                },
            }
        }
        self.paused = False
        self.corrections: list[tuple[list[dict[str, str]], str]] = []  # correct() calls, in order
        self.advised = 0  # advise() calls
        self.advice: list[dict[str, str]] = [
            {"level": "ok", "code": "validation", "message": "A validation split of 40 examples is set aside."},
            {
                "level": "warning",
                "code": "few_examples",
                "message": "Only 340 examples: fewer than 500, prompting may serve better.",
            },
            {
                "level": "warning",
                "code": "dominant_source",
                "message": "policies.jsonl holds 90% of the records; the model will mostly learn its style.",
            },
        ]
        self.me: dict[str, Any] = {"name": "admin", "role": "admin", "collections": None}
        self.key_list: list[dict[str, Any]] = [
            {"name": "admin", "role": "admin", "collections": None, "created": 1_700_000_000, "revoked": None}
        ]

    # --- the core commands
    def status(self) -> Status:
        current = next((v.version for v in self.versions if v.current), None)
        return Status(
            self.home,
            current,
            len(self.versions),
            12,
            340,
            3,
            self.endpoint,
            job=self.job,
            server={"address": self.endpoint, "health": "no daemon running", "daemon_pid": None},
            inbox={"new": 2, "ingested": 12, "quarantined": 1, "watching": True, "paused": self.paused},
            unlearned=sum(not d.learned for d in self.documents),
        )

    def ingest(self, emit: Emit = ignore) -> dict[str, Any]:
        self.calls.append(("ingest",))
        emit(Message("ingest", "read 2 files"))
        self.quarantine = [QuarantinedFile(q["file"], q["reasons"]) for q in self.ingest_report["quarantined"]]
        return self.ingest_report

    def train(
        self, snapshot: str | None = None, max_steps: int | None = None, emit: Emit = ignore, run_id: str | None = None
    ) -> str:
        self.calls.append(("train",))
        return "run-x"

    def export(self, run: str, quant: str | None = None, emit: Emit = ignore, adapter: bool = False) -> ModelVersion:
        self.calls.append(("export", run))
        return version("v3", time.time())

    def models(self) -> list[ModelVersion]:
        return list(self.versions)

    def promote(self, version: str) -> None:
        self.calls.append(("promote", version))
        if self.fail_promote:
            raise self.fail_promote
        self.versions = [ModelVersion(**{**v.__dict__, "current": v.version == version}) for v in self.versions]

    def rollback(self) -> str:
        self.calls.append(("rollback",))
        return "base"

    # --- the daemon's commands and views
    def emit_event(self, event: Any) -> None:
        self.log.append(event.to_dict())

    def events(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        return self.log[offset:], len(self.log)

    def retrain(self) -> dict[str, Any]:
        self.calls.append(("retrain",))
        return {"id": 7, "kind": "train", "state": "queued"}

    def forget(self, document: str) -> dict[str, Any]:
        self.calls.append(("forget", document))
        return {}

    def pause_watching(self) -> None:
        self.calls.append(("pause",))
        self.paused = True

    def resume_watching(self) -> None:
        self.calls.append(("resume",))
        self.paused = False

    def jobs(self, limit: int = 50) -> list[dict[str, Any]]:
        return [
            {
                "id": 2,
                "kind": "train",
                "state": "refused",
                "stage": "gate",
                "run_id": "r2",
                "version": None,
                "error": None,
                "reason": "new data",
                "created": 1_700_150_000,
                "updated": 1_700_150_600,
            }
        ]

    def audit_entries(self) -> list[dict[str, Any]]:
        return list(self.audit)

    def verify_audit(self) -> dict[str, Any]:
        return {"ok": True, "entries": len(self.audit), "bad_line": None, "reason": None}

    def lineage(self, version: str) -> dict[str, Any] | None:
        if version != "v1":
            return None
        return {
            "version": "v1",
            "documents": [
                {"sha256": d.sha256, "path": d.path, "records": d.records} for d in self.documents if d.learned
            ],
            "training": {
                "best_val_loss": 1.91,
                "method": "qlora",
                "method_reason": "340 examples and 6 GB free: 4-bit base with a LoRA adapter",
            },
            "gate": self.reports["run-v1"],
        }

    def sources(self) -> list[Document]:
        return list(self.documents)

    def quarantined(self) -> list[QuarantinedFile]:
        return list(self.quarantine)

    def eval_report(self, run: str) -> dict[str, Any] | None:
        return self.reports.get(run)

    def evaluate(self, run: str, emit: Emit = ignore) -> dict[str, Any]:
        self.calls.append(("evaluate", run))
        return self.reports.get(run) or {"passed": False, "checks": []}

    # --- the practitioner's tools
    def advise(self) -> list[dict[str, str]]:
        self.advised += 1
        return list(self.advice)

    def set_method(self, method: str) -> str:
        self.calls.append(("set_method", method))
        return method

    def correct(self, messages: list[dict[str, str]], answer: str) -> str:
        self.corrections.append((messages, answer))
        return str(self.home / "inbox" / "correction-1.jsonl")

    def reviews(self) -> list[dict[str, Any]]:
        return []

    def vote(
        self, run: str, approve: bool, comment: str = "", preferences: dict[int, str] | None = None
    ) -> dict[str, Any]:
        raise RegistryError(f"run {run} does not wait for review")

    # --- collections and keys: one collection (the shared one) and one admin key
    def collections(self) -> list[dict[str, Any]]:
        status = self.status()
        return [
            {
                "name": "",
                "display": "shared",
                "model_id": "appliance",
                "current": status.current,
                "mode": "merged",
                "documents": status.documents,
                "records": status.records,
                "inbox_files": status.inbox_files,
                "index": {"documents": status.documents, "passages": 3 * status.documents},
            }
        ]

    def ask(self, question: str, grounding: bool = True, secret: str | None = None) -> dict[str, Any]:
        self.calls.append(("ask", question, grounding))
        return {"answer": "", "model": "appliance", "sources": [], "grounding": {"used": grounding, "reason": None}}

    def scoped(self, collection: str) -> ScriptedEngine:
        if collection in ("", "shared"):
            return self
        raise AccessError(f"no collection '{collection}'")

    def api_key(self) -> str | None:
        return read_api_key(self.home)

    def whoami(self) -> dict[str, Any]:
        return dict(self.me)

    def keys(self) -> list[dict[str, Any]]:
        return [dict(k) for k in self.key_list]

    def add_key(self, name: str, role: str, collections: list[str] | None = None) -> str:
        self.calls.append(("add_key", name, role, collections))
        self.key_list.append(
            {"name": name, "role": role, "collections": collections, "created": time.time(), "revoked": None}
        )
        return f"secret-of-{name}"

    def revoke_key(self, name: str) -> None:
        self.calls.append(("revoke_key", name))
        for k in self.key_list:
            if k["name"] == name:
                k["revoked"] = time.time()


def test_the_scripted_engine_keeps_the_whole_contract():
    """Every Engine method is here with the contract's parameters, so the screens meet no gaps the
    real engine does not have (mypy confirms the real one: tests/test_boundaries.py)."""
    import inspect

    from appliance.contract.api import Engine

    for name, member in vars(Engine).items():
        if callable(member) and not name.startswith("_"):
            ours = getattr(ScriptedEngine, name)
            assert list(inspect.signature(ours).parameters) == list(inspect.signature(member).parameters), name


@pytest.fixture()
def engine(tmp_path: Path) -> ScriptedEngine:
    (tmp_path / "api_key").write_text("test-key\n")
    return ScriptedEngine(tmp_path)


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def settle(pilot, app, until=lambda: True, timeout: float = 10.0) -> None:
    """Let workers and the poll timer run until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await pilot.pause(0.05)
        if until():
            return
    raise AssertionError("condition not reached")


async def test_every_screen_renders_at_80x24_and_keys_switch(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        for key, mode, screen in (
            ("m", "models", "ModelsScreen"),
            ("i", "data", "DataScreen"),
            ("a", "activity", "ActivityScreen"),
            ("c", "chat", "ChatScreen"),
            ("escape", None, "ChatScreen"),
            ("d", "dashboard", "DashboardScreen"),
        ):
            await pilot.press(key)
            await settle(pilot, app, lambda screen=screen: type(app.screen).__name__ == screen)
            if mode:
                assert app.current_mode == mode
        await pilot.click("#nav-models")  # the navigation bar works with the mouse
        await settle(pilot, app, lambda: app.current_mode == "models")
        await pilot.click("#nav-dashboard")
        await settle(pilot, app, lambda: app.current_mode == "dashboard")
        await pilot.press("question_mark")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "HelpScreen")
        await pilot.press("escape")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "DashboardScreen")


async def test_dashboard_follows_the_engine_in_plain_words(engine):
    app = make_app(engine, poll_seconds=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: "waiting in the inbox" in text_of(app, "#sentence"))
        assert text_of(app, "#sentence") == "2 new documents waiting in the inbox."
        facts = text_of(app, "#facts")
        assert "Model: v1" in facts and "validation loss 1.91 vs 2.05 ok" in facts and "4/5" in facts
        assert "2 new · 12 document(s) learned · 1 quarantined" in facts
        assert "not running" in facts  # nothing listens on port 9
        now = time.time()
        engine.emit_event(StageStarted("train", total=400, description="Learning from 3 new documents", at=now - 60))
        engine.emit_event(Progress("train", completed=119, total=400, metrics={"loss": 2.6}, at=now))
        engine.job = {
            "id": 3,
            "kind": "train",
            "stage": "train",
            "since": now - 70,
            "progress": {"stage": "train", "completed": 120, "total": 400, "metrics": {"loss": 2.5, "eta_s": 360.0}},
        }
        await settle(pilot, app, lambda: "step 120" in text_of(app, "#sentence"))
        assert text_of(app, "#sentence") == "Learning from 3 new documents — step 120 of 400, about 6 minutes left"
        assert app.screen.query_one("#stage-train").has_class("-current")
        assert not app.screen.query_one("#stage-ingest").has_class("-current")
        engine.emit_event(Progress("train", completed=200, total=400, metrics={"loss": 2.1, "val_loss": 2.3}))
        engine.job["progress"] = {"stage": "train", "completed": 200, "total": 400, "metrics": {"eta_s": 20.0}}
        await settle(pilot, app, lambda: "step 200" in text_of(app, "#sentence"))
        assert "less than a minute left" in text_of(app, "#sentence")
        assert "2.100" in str(app.screen.query_one("#train-label").render())
        assert "2.300" in str(app.screen.query_one("#val-label").render())
        assert app.screen.query_one("#progress").progress == 200
        engine.job = None
        engine.emit_event(StageFinished("train", summary="done"))
        engine.emit_event(StageFinished("gate", summary="keep the current model v1: validation_loss: worse"))
        await settle(pilot, app, lambda: "refused" in text_of(app, "#facts"))
        assert "validation_loss: worse" in text_of(app, "#facts")
        assert not app.screen.query_one("#stage-train").has_class("-current")


async def test_documents_stored_but_not_yet_learned_are_told_apart(engine):
    engine.documents.append(Document("new-policy.md", "cc" * 32, "md", 5, facts=4, questions=28))
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: "not yet learned" in text_of(app, "#facts"))
        assert "2 new · 12 document(s) stored, 1 not yet learned · 1 quarantined" in text_of(app, "#facts")
        await pilot.press("i")
        await settle(pilot, app, lambda: app.screen.query_one("#sources", DataTable).row_count == 3)
        table = app.screen.query_one("#sources", DataTable)
        assert [tuple(map(str, table.get_row_at(i))) for i in range(3)] == [
            ("policies.jsonl", "jsonl", "40", "yes", "-", "-", "-"),
            ("facts.md", "md", "9", "yes", "30", "210", "90%"),
            ("new-policy.md", "md", "5", "not yet", "4", "28", "⚠ not asked"),
        ]
        # the facts of the document the model has not learned are flagged as not known yet
        assert "does not know the facts of 1 document(s) yet" in text_of(app, "#sources-note")
        assert "1 document(s) stored, not yet learned" in text_of(app, "#sources-note")
        engine.documents = [Document(f"doc-{i}.md", f"{i:064x}", "md", 1) for i in range(12)]
        await pilot.press("d")  # no served version was trained on any of the 12
        await settle(pilot, app, lambda: "12 document(s) stored, not yet learned" in text_of(app, "#facts"))


async def test_promote_asks_first_and_cancel_does_nothing(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m")
        await settle(pilot, app, lambda: app.screen.query_one(DataTable).row_count == 3)
        await pilot.press("down", "down")  # v2
        await pilot.press("p")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        said = str(app.screen.query_one("#consequence", Static).render())
        assert "v2 instead of v1" in said and "roll back to v1" in said
        await pilot.press("n")
        await settle(pilot, app, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(0.2)
        assert engine.calls == []
        await pilot.press("p")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, app, lambda: ("promote", "v2") in engine.calls)
        await settle(pilot, app, lambda: "v2 ●" in str(app.screen.query_one(DataTable).get_row_at(2)[0]))


async def test_rollback_with_the_mouse(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m")
        await settle(pilot, app, lambda: app.screen.query_one(DataTable).row_count == 3)
        await pilot.press("r")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.click("#yes")
        await settle(pilot, app, lambda: ("rollback",) in engine.calls)


async def test_engine_error_becomes_a_notification(engine):
    engine.fail_promote = RegistryError("models/v2/model.gguf changed on disk; export the run again")
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m")
        await settle(pilot, app, lambda: app.screen.query_one(DataTable).row_count == 3)
        await pilot.press("down", "down", "p")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, app, lambda: any(n.severity == "error" for n in app._notifications))
        errors = [n for n in app._notifications if n.severity == "error"]
        assert errors[0].title == "Model registry" and "export the run again" in errors[0].message
        assert app.is_running and type(app.screen).__name__ == "ModelsScreen"


async def test_unexpected_poll_failure_is_a_notification(engine):
    def broken() -> Status:
        raise OSError("store/index.db: disk I/O error")

    engine.status = broken
    app = make_app(engine, poll_seconds=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: any(n.severity == "error" for n in app._notifications))
        await pilot.pause(0.4)
        errors = [n for n in app._notifications if n.severity == "error"]
        assert len(errors) == 1 and "disk I/O error" in errors[0].message  # once, not once per poll


async def test_ingest_now_shows_quarantine_reasons(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("i")
        await settle(pilot, app, lambda: "Nothing quarantined" in text_of(app, "#quarantine-note"))
        await settle(pilot, app, lambda: app.screen.query_one("#sources", DataTable).row_count == 2)
        assert "learned every document" in text_of(app, "#sources-note")
        await pilot.press("n")
        await settle(pilot, app, lambda: app.screen.query_one("#quarantine", DataTable).row_count == 1)
        assert engine.calls == [("ingest",)]
        row = app.screen.query_one("#quarantine", DataTable).get_row_at(0)
        assert row[0] == "scan.pdf" and "no text layer" in row[1]
        await pilot.press("a")
        await settle(pilot, app, lambda: app.screen.query_one(DataTable).row_count >= 1)
        assert "read 2 files" in " ".join(map(str, app.screen.query_one(DataTable).get_row_at(0)))


async def test_activity_filter(engine):
    engine.emit_event(Message("ingest", "read policies.jsonl"))
    engine.emit_event(Message("train", "resuming run r1 from step 5"))
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("a")
        table = app.screen.query_one(DataTable)
        await settle(pilot, app, lambda: table.row_count == 4)  # two events, an audit entry, a job
        assert any("#2 train refused" in table.get_row_at(i)[2] for i in range(4))
        await pilot.click("#filter")
        await pilot.press(*"resum")
        await settle(pilot, app, lambda: table.row_count == 1)
        assert "resuming" in table.get_row_at(0)[3]


@pytest.mark.parametrize("theme", [LIGHT, DARK])
async def test_both_themes_render(engine, theme):
    app = make_app(engine, poll_seconds=0.2, theme=theme)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        assert app.theme == theme
        svg = app.export_screenshot()
        assert "Model:" in svg.replace("&#160;", " ")
        await pilot.press("ctrl+t")
        assert app.theme == (DARK if theme == LIGHT else LIGHT)


# --- chat over real HTTP -------------------------------------------------------------


def sse_app(key: str) -> Starlette:
    """The endpoint's SSE shape (serve.py): data: {chunk}\\n\\n ... data: [DONE]."""

    async def chat(request: Request):
        if request.headers.get("authorization") != f"Bearer {key}":
            return JSONResponse({"error": {"message": "missing or wrong API key"}}, status_code=401)
        body = await request.json()
        words = f"{body['model']} says: {body['messages'][-1]['content']}".split()

        async def stream():
            for w in words:
                yield f"data: {json.dumps({'choices': [{'delta': {'content': w + ' '}}], 'model': body['model']})}\n\n"
                await asyncio.sleep(0.01)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def health(_: Request):
        return JSONResponse({"status": "ok", "model": "v1"})

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)])


@pytest.fixture()
def sse_server():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(sse_app("test-key"), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(5)


def test_client_streams_sse_pieces(engine, sse_server):
    engine.endpoint = sse_server
    pieces = list(Client(engine).stream_chat([{"role": "user", "content": "hello there"}], "v1"))
    assert pieces == ["v1 ", "says: ", "hello ", "there "]
    assert Client(engine).health() == "answering (v1)"


def test_client_says_what_to_do_when_the_key_is_wrong(engine, sse_server):
    engine.endpoint = sse_server
    (engine.home / "api_key").write_text("wrong\n")
    with pytest.raises(Exception, match="HTTP 401.*wrong API key"):
        list(Client(engine).stream_chat([{"role": "user", "content": "hi"}]))


async def ask_and_wait(pilot, app, question: str) -> None:
    await pilot.press("c")
    await settle(pilot, app, lambda: app.screen.focused is not None and app.screen.focused.id == "question")
    await pilot.press(*question, "enter")
    await settle(pilot, app, lambda: "left" in app.screen.answers)


async def test_chat_streams_and_compares(engine, sse_server):
    engine.endpoint = sse_server
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await ask_and_wait(pilot, app, "what is the policy")
        screen = app.screen
        assert screen.answers["left"] == "appliance says: what is the policy "
        await pilot.press("ctrl+o")
        await pilot.press(*"hi", "enter")
        await settle(pilot, app, lambda: screen.answers.get("right", "").startswith("base says"))
        assert screen.answers["left"] == "appliance says: hi "
        assert screen.query_one("#right").display


async def test_chat_without_an_endpoint_says_how_to_start_it(engine):
    engine.endpoint = f"http://127.0.0.1:{free_port()}/v1"
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        await settle(pilot, app, lambda: app.screen.focused is not None and app.screen.focused.id == "question")
        await pilot.press(*"hello", "enter")
        await settle(pilot, app, lambda: any(n.severity == "error" for n in app._notifications))
        note = next(n for n in app._notifications if n.severity == "error")
        assert "appliance serve" in note.message and app.is_running


async def test_retrain_pause_and_lineage_use_the_daemon_api(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await pilot.press("t")
        await settle(pilot, app, lambda: any("job 7" in n.message for n in app._notifications))
        assert "appliance run" in next(n.message for n in app._notifications if "job 7" in n.message)
        await pilot.press("w")
        await settle(pilot, app, lambda: "paused" in text_of(app, "#sentence"))
        await pilot.press("w")
        await settle(pilot, app, lambda: ("resume",) in engine.calls)
        await pilot.press("m")
        await settle(pilot, app, lambda: app.screen.query_one(DataTable).row_count == 3)
        await pilot.press("down", "l")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "LineageScreen")
        shown = app.screen.query_one("#lineage").source
        assert "policies.jsonl | 40" in shown and "facts.md | 9" in shown and "validation loss 1.91 vs 2.05" in shown
        await pilot.press("escape")
        await pilot.press("down", "l")  # v2 has no lineage: said so, in place
        await settle(pilot, app, lambda: "No lineage recorded" in text_of(app, "#detail"))


async def test_forget_needs_confirmation(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("i")
        await settle(pilot, app, lambda: app.screen.query_one("#sources", DataTable).row_count == 2)
        app.screen.query_one("#sources", DataTable).focus()
        await pilot.press("down", "f")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        assert "no rollback can bring it back" in str(app.screen.query_one("#consequence", Static).render())
        await pilot.press("escape")
        await settle(pilot, app, lambda: not isinstance(app.screen, ConfirmScreen))
        await pilot.pause(0.2)
        assert not any(c[0] == "forget" for c in engine.calls)
        await pilot.press("f")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, app, lambda: ("forget", "bb" * 32) in engine.calls)


async def test_command_palette_runs_actions(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await pilot.press("ctrl+p")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "CommandPalette")
        await pilot.press(*"Ingest now")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot, app, lambda: ("ingest",) in engine.calls)
        await pilot.press("ctrl+p")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "CommandPalette")
        await pilot.press(*"Go to Models")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await settle(pilot, app, lambda: app.current_mode == "models")


async def test_chat_asks_the_chosen_version(engine, sse_server):
    engine.endpoint = sse_server
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        screen = app.screen
        await settle(pilot, app, lambda: screen.models == ["base", "v1", "v2"])
        screen.query_one("#model").value = "v2"
        screen.query_one("#question").focus()
        await pilot.press(*"hello", "enter")
        await settle(pilot, app, lambda: "left" in screen.answers)
        assert screen.answers["left"] == "v2 says: hello "


async def test_a_failing_background_read_is_reported_once(engine):
    def broken() -> None:
        raise OSError("store/index.db: permission denied")

    engine.sources = broken
    app = make_app(engine, poll_seconds=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("i")
        await settle(pilot, app, lambda: any(n.severity == "error" for n in app._notifications))
        await pilot.pause(0.6)  # several more polls
        errors = [n for n in app._notifications if n.severity == "error"]
        assert len(errors) == 1 and "permission denied" in errors[0].message and app.is_running


def test_a_stage_left_unfinished_in_an_old_log_is_not_shown_as_running(engine):
    """A daemon killed mid-stage leaves no StageFinished; with no job in the journal, that
    old StageStarted must not make the dashboard say the stage runs."""
    engine.emit_event(StageStarted("train", total=10, description="Learning from 1 example", at=time.time() - 3600))
    board = Client(engine).board()
    assert board.stage is None and board.sentence().startswith("2 new documents")
    engine.job = {"id": 1, "kind": "train", "stage": "train", "since": time.time(), "progress": None}
    board = Client(engine).board()
    assert board.stage == "train" and board.sentence() == "Learning from 1 example"


def test_version_numbers_come_from_the_engines_metrics(tmp_path):
    v3 = ModelVersion(
        "v3",
        1.0,
        "Q4_K_M",
        1,
        "ab" * 32,
        "r3",
        "s3",
        False,
        {"best_val_loss": 1.5, "gate_val_loss": None, "gate_passed": True, "documents": 0},
    )
    details = Client(ScriptedEngine(tmp_path)).version_details(v3)
    assert details["val_loss"] == 1.5 and details["passed"] is True and details["probes"] is None


# --- issue 10: corrections flow back, the data advisor, the training method ------------------------


async def test_a_wrong_answer_is_corrected_through_the_engine(engine, sse_server):
    from textual.widgets import Button, TextArea

    from tui.screens.chat import SAVED, CorrectionScreen

    engine.endpoint = sse_server
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await pilot.press("c")
        await settle(pilot, app, lambda: app.screen.focused is not None and app.screen.focused.id == "question")
        assert app.screen.query_one("#correct", Button).disabled  # nothing answered yet
        await pilot.press(*"what is the fee", "enter")
        await settle(pilot, app, lambda: "left" in app.screen.answers)
        chat = app.screen
        assert not chat.query_one("#correct", Button).disabled
        footer = app.export_screenshot().replace("&#160;", " ")
        assert "Wrong answer" in footer  # the key is shown in the footer
        await pilot.press("ctrl+r")  # from inside the question box
        await settle(pilot, app, lambda: isinstance(app.screen, CorrectionScreen))
        assert app.screen.query_one(TextArea).text == "appliance says: what is the fee"
        await pilot.press("escape")  # cancel: nothing is saved
        await settle(pilot, app, lambda: app.screen is chat)
        await pilot.pause(0.3)
        assert engine.corrections == []
        await pilot.click("#correct")  # the button does the same
        await settle(pilot, app, lambda: isinstance(app.screen, CorrectionScreen))
        await pilot.press("ctrl+s")  # unchanged: refused in place, not saved
        await pilot.pause(0.1)
        assert "still the model's answer" in text_of(app, "#problem") and engine.corrections == []
        await pilot.press(*"The fee is 20 euros", "enter", *"per visit")  # typing replaces the selected answer
        await pilot.press("ctrl+s")
        await settle(pilot, app, lambda: engine.corrections != [])
        assert engine.corrections == [
            ([{"role": "user", "content": "what is the fee"}], "The fee is 20 euros\nper visit")
        ]
        await settle(pilot, app, lambda: any(n.message == SAVED for n in app._notifications))
        assert app.screen is chat and app.is_running


async def test_correcting_before_any_answer_asks_for_a_question_first(engine):
    from tui.screens.chat import CorrectionScreen

    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("c")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "ChatScreen")
        await pilot.press("ctrl+r")
        await settle(pilot, app, lambda: any("Ask a question first" in n.message for n in app._notifications))
        assert not isinstance(app.screen, CorrectionScreen) and engine.corrections == []


def advice_lines(app) -> list[tuple[str, str]]:
    return [
        (str(w.render()), "warning" if w.has_class("advice-warning") else "ok")
        for w in app.screen.query("#advice Static")
    ]


async def test_data_advisor_shows_warnings_first_at_80x24(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("i")
        await settle(pilot, app, lambda: len(advice_lines(app)) == 3)
        lines = advice_lines(app)
        assert [level for _, level in lines] == ["warning", "warning", "ok"]
        assert lines[0][0].startswith("⚠ Only 340 examples") and lines[2][0].startswith("✓ A validation split")
        screen_text = app.export_screenshot().replace("&#160;", " ")
        assert "⚠ Only 340 examples" in screen_text  # visible without scrolling
        assert "⚠ policies.jsonl holds 90%" in screen_text
        before = engine.advised
        await pilot.pause(0.6)  # polls alone do not re-ask the advisor
        assert engine.advised == before
        engine.advice = [{"level": "ok", "code": "few_examples", "message": "2000 examples: enough to train."}]
        await pilot.press("n")  # ingest now: the advice is read again
        await settle(pilot, app, lambda: advice_lines(app) == [("✓ 2000 examples: enough to train.", "ok")])
        assert engine.advised > before


def test_client_sorts_advice_warnings_first_and_keeps_order(engine):
    advice = Client(engine).advise()
    assert [a["code"] for a in advice] == ["few_examples", "dominant_source", "validation"]


async def test_models_show_the_training_method_and_why(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m")
        table = app.screen.query_one(DataTable)
        await settle(pilot, app, lambda: table.row_count == 3 and table.get_row_at(1)[6] == "qlora")
        assert table.get_row_at(0)[6] == "-" and table.get_row_at(2)[6] == "-"  # no method recorded: a dash
        await pilot.press("down")
        await settle(pilot, app, lambda: "Trained with qlora: 340 examples" in text_of(app, "#detail"))
        assert "Answers vs reference: EM 0.30, F1 0.52, ROUGE-L 0.48, BLEU 21.0 (model it replaced: EM 0.10" in text_of(
            app, "#detail"
        )
        await pilot.press("l")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "LineageScreen")
        source = app.screen.query_one("#lineage").source
        assert "Trained with qlora" in source and "Sample answers (1 validation questions)" in source
        assert "| Which extension reaches the pharmacist? | 4417. | Extension 4417. | I do not know. |" in source


def test_training_method_comes_from_metrics_or_lineage():
    from tui.board import training_method

    assert training_method({"method": "dora", "method_reason": "asked for"}, None) == ("dora", "asked for")
    assert training_method({}, {"training": {"settings": {"method": "auto"}}}) == (None, None)
    assert training_method({}, {"training": {"method": "full", "method_reason": None}}) == ("full", None)


async def test_choosing_the_training_method_from_the_models_screen(engine):
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("m")
        await settle(pilot, app, lambda: app.screen.query_one(DataTable).row_count == 3)
        await pilot.press("e")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "MethodScreen")
        await pilot.press("escape")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "ModelsScreen")
        assert not [c for c in engine.calls if c[0] == "set_method"]
        await pilot.press("e")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "MethodScreen")
        await pilot.press("down", "down", "down", "down", "down", "enter")  # auto, qlora, lora, dora, adalora, ia3
        await settle(pilot, app, lambda: ("set_method", "ia3") in engine.calls)
