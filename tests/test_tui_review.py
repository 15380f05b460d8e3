"""The Review screen driven by Pilot against a scripted engine (test_tui.py's, plus the review calls).

The scripted engine keeps a review the way the real one does (appliance/engine/review.py,
driven for real in test_review.py): answers in a stored A/B order, versions given
only with a vote's result, one vote per reviewer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_tui import SIZE, ScriptedEngine, settle
from textual.containers import VerticalScroll
from textual.widgets import Input, Static

from appliance.contract.errors import AccessError, ApplianceError
from tui.app import make_app
from tui.widgets import ConfirmScreen

pytestmark = pytest.mark.anyio


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


ITEMS = [
    {
        "index": 0,
        "question": "How do I book an interpreter?",
        "context": [],
        "answer_a": "Call extension 4410 a day ahead.",
        "answer_b": "Ask at reception.",
        "a": "candidate",
    },
    {
        "index": 1,
        "question": "When is the pharmacy open?",
        "context": [],
        "answer_a": "Until 8 pm.",
        "answer_b": "From 8 am to 10 pm on weekdays.",
        "a": "current",
    },
]


class ReviewingEngine(ScriptedEngine):
    """ScriptedEngine with one candidate (run-17) waiting for review."""

    def __init__(self, home: Path, approvals_needed: int = 1):
        super().__init__(home)
        self.needed = approvals_needed
        self.votes: list[dict[str, Any]] = []
        self.state = "pending"

    def reviews(self) -> list[dict[str, Any]]:
        if self.state != "pending":
            return []
        return [
            {
                "run": "run-17",
                "job": 5,
                "created": 1_700_200_000,
                "state": "pending",
                "approvals": sum(v["approve"] for v in self.votes),
                "approvals_needed": self.needed,
                "voters": [],
                "voted": False,
                "items": [{k: v for k, v in i.items() if k != "a"} for i in ITEMS],
            }
        ]

    def vote(
        self, run: str, approve: bool, comment: str = "", preferences: dict[int, str] | None = None
    ) -> dict[str, Any]:
        self.calls.append(("vote", run, approve, comment, dict(preferences or {})))
        if self.votes:
            raise ApplianceError(f"run {run}: ana has already voted on this candidate; each reviewer votes once")
        self.votes.append({"approve": approve})
        if not approve:
            self.state = "rejected"
        elif sum(v["approve"] for v in self.votes) >= self.needed:
            self.state = "approved"
            self.promote("v2")
        names = {"candidate": "v2", "current": "v1"}
        other = {"candidate": "current", "current": "candidate"}
        return {
            "run": run,
            "job": 5,
            "state": self.state,
            "job_state": {"approved": "done", "rejected": "refused"}.get(self.state, "awaiting_review"),
            "approvals": sum(v["approve"] for v in self.votes),
            "approvals_needed": self.needed,
            "current": next(v.version for v in self.versions if v.current),
            "reveal": [
                {
                    "index": i["index"],
                    "a": names[i["a"]],
                    "b": names[other[i["a"]]],
                    "a_is": i["a"],
                    "b_is": other[i["a"]],
                }
                for i in ITEMS
            ],
        }


def text(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def title(app, side: str) -> str:
    return str(app.screen.query_one(f"#pane-{side}", VerticalScroll).border_title)


async def open_review(pilot, app) -> None:
    await settle(pilot, app, lambda: app.board is not None)
    await pilot.press("v")
    await settle(pilot, app, lambda: type(app.screen).__name__ == "ReviewScreen")
    await settle(pilot, app, lambda: "run-17" in text(app, "#queue"))


async def test_prefer_approve_confirm_then_versions_are_revealed(tmp_path: Path):
    engine = ReviewingEngine(tmp_path)
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await open_review(pilot, app)
        review = app.screen
        assert "0/1 approvals" in text(app, "#queue") and "not voted yet" in text(app, "#queue")
        assert "interpreter" in text(app, "#question")
        assert "extension 4410" in text(app, "#answer-a") and "reception" in text(app, "#answer-b")
        assert (title(app, "a"), title(app, "b")) == ("A", "B")  # versions hidden before the vote
        screen_text = app.export_screenshot()
        assert "= v" not in screen_text and "(candidate)" not in screen_text and "(current)" not in screen_text
        await pilot.press("2")  # prefer B on question 1
        assert "preferred" in title(app, "b")
        await pilot.press("right")
        await settle(pilot, app, lambda: "pharmacy" in text(app, "#question"))
        await pilot.press("1")  # prefer A on question 2
        await pilot.press("y")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "CommentScreen")
        await pilot.press(*"reads well", "enter")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        assert "last approval" in str(app.screen.query_one("#consequence", Static).render())
        assert not [c for c in engine.calls if c[0] == "vote"]  # nothing before the confirmation
        await pilot.press("y")
        await settle(pilot, app, lambda: any(c[0] == "vote" for c in engine.calls))
        assert [c for c in engine.calls if c[0] == "vote"] == [("vote", "run-17", True, "reads well", {0: "b", 1: "a"})]
        await settle(pilot, app, lambda: app.screen is review and "you voted: approved" in text(app, "#queue"))
        assert title(app, "a").startswith("A = v1 (current)")  # question 2: A was the current model
        await pilot.press("left")
        await settle(pilot, app, lambda: title(app, "a").startswith("A = v2 (candidate)"))
        assert title(app, "b").startswith("B = v1 (current)")
        assert ("promote", "v2") in engine.calls
        await pilot.press("y")  # one vote per reviewer
        await settle(
            pilot, app, lambda: any("voted on this candidate already" in n.message for n in app._notifications)
        )
        assert len([c for c in engine.calls if c[0] == "vote"]) == 1


async def test_reject_needs_words_and_a_confirmation_and_keeps_the_current_model(tmp_path: Path):
    engine = ReviewingEngine(tmp_path)
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await open_review(pilot, app)
        review = app.screen
        await pilot.press("x")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "CommentScreen")
        await pilot.press("enter")  # no reason given: asked again
        await settle(pilot, app, lambda: "Say why" in text(app, "#problem"))
        await pilot.press("escape")  # cancel: no vote
        await settle(pilot, app, lambda: app.screen is review)
        await pilot.press("x")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "CommentScreen")
        app.screen.query_one(Input).value = "too terse"
        await pilot.press("enter")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        assert "current model keeps serving" in str(app.screen.query_one("#consequence", Static).render())
        await pilot.press("n")  # not confirmed: no vote
        await settle(pilot, app, lambda: app.screen is review)
        await pilot.pause(0.3)
        assert not [c for c in engine.calls if c[0] == "vote"]
        await pilot.press("x")
        await settle(pilot, app, lambda: type(app.screen).__name__ == "CommentScreen")
        await pilot.press(*"too terse", "enter")
        await settle(pilot, app, lambda: isinstance(app.screen, ConfirmScreen))
        await pilot.press("y")
        await settle(pilot, app, lambda: "you voted: rejected" in text(app, "#queue"))
        assert [c for c in engine.calls if c[0] == "vote"] == [("vote", "run-17", False, "too terse", {})]
        assert ("promote", "v2") not in engine.calls and "serving v1" in text(app, "#queue")
        assert title(app, "a").startswith("A = v2 (candidate)")  # revealed after the vote
        await pilot.press("d")  # leave and come back: queue empty
        await settle(pilot, app, lambda: type(app.screen).__name__ == "DashboardScreen")
        await pilot.press("v")
        await settle(
            pilot,
            app,
            lambda: "No candidate is waiting" in text(app, "#queue") or "you voted: rejected" in text(app, "#queue"),
        )


async def test_a_key_that_may_not_review_is_told_why_once(tmp_path: Path):
    (tmp_path / "api_key").write_text("k\n")
    engine = ScriptedEngine(tmp_path)

    def refused() -> list[dict[str, Any]]:
        raise AccessError("key 'bob' (role chat) may not run 'reviews': it needs the approver role")

    engine.reviews = refused
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await pilot.press("v")
        await settle(pilot, app, lambda: any("approver role" in n.message for n in app._notifications))
        await pilot.press("y")
        await settle(pilot, app, lambda: any("No candidate" in n.message for n in app._notifications))
        assert len([n for n in app._notifications if "approver role" in n.message]) == 1 and app.is_running


async def test_an_empty_queue_says_how_review_is_switched_on(tmp_path: Path):
    engine = ReviewingEngine(tmp_path)
    engine.state = "approved"
    app = make_app(engine, poll_seconds=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot, app, lambda: app.board is not None)
        await pilot.press("v")
        await settle(
            pilot,
            app,
            lambda: type(app.screen).__name__ == "ReviewScreen" and "No candidate is waiting" in text(app, "#queue"),
        )
        assert 'promotion = "review"' in text(app, "#queue")
