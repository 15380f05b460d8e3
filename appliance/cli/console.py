"""Rendering stage events on a terminal with rich: one progress bar per stage."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bar

from appliance.contract.events import Event, Message, Progress, StageFinished, StageStarted


class ProgressDisplay:
    """An ``Emit`` callback that draws events; use as a context manager."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.bar = Bar(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[stage]:<9}"),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
            disable=not enabled,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressDisplay:
        self.bar.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            # On failure the error line is what matters: drop the unfinished bars so a
            # non-interactive log ends with one clear line rather than a half-drawn bar.
            for task in list(self.bar.tasks):
                if not task.finished:
                    self.bar.remove_task(task.id)
        self.bar.stop()

    def __call__(self, event: Event) -> None:
        if isinstance(event, StageStarted):
            task = self.tasks.get(event.stage)
            if task is None:
                self.tasks[event.stage] = self.bar.add_task(
                    event.description, total=event.total, stage=event.stage, metrics=""
                )
            else:
                self.bar.update(task, description=event.description, total=event.total, completed=0)
        elif isinstance(event, Progress):
            task = self._task(event.stage)
            self.bar.update(task, completed=event.completed, total=event.total, metrics=_metrics(event.metrics))
        elif isinstance(event, StageFinished):
            task = self._task(event.stage)
            total = self.bar.tasks[task].total or 1
            self.bar.update(task, completed=total, total=total, description=event.summary)
        elif isinstance(event, Message) and event.level != "debug":
            style = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
            self.bar.console.print(f"[{style}]{event.stage}: {escape(event.text)}[/]", markup=True, highlight=False)

    def _task(self, stage: str) -> Any:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=None, stage=stage, metrics="")
        return self.tasks[stage]


def _metrics(metrics: dict[str, float]) -> str:
    shown = []
    for key, label, fmt in (("loss", "loss", ".3f"), ("val_loss", "val", ".3f"), ("tokens_per_s", "tok/s", ".0f")):
        if key in metrics:
            shown.append(f"{label} {metrics[key]:{fmt}}")
    return " ".join(shown)
