"""The engine interface the CLI and the TUI use: a Protocol and plain data types.

This module must stay importable without torch, transformers, llama_cpp or textual
(tests/test_boundaries.py checks it in a fresh interpreter): front ends depend on
this contract, not on the machinery behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .events import Emit, ignore


@dataclass(frozen=True)
class ModelVersion:
    version: str
    created: float
    quant: str
    size: int
    sha256: str
    run: str | None
    snapshot: str | None
    current: bool


@dataclass(frozen=True)
class Status:
    home: Path
    current: str | None
    versions: int
    documents: int
    records: int
    inbox_files: int
    endpoint: str
    runs: list[str] = field(default_factory=list)


class Engine(Protocol):
    """Every operation a person can ask for. Errors are ``appliance.errors.ApplianceError``."""

    home: Path

    def status(self) -> Status: ...

    def ingest(self, emit: Emit = ignore) -> dict[str, Any]:
        """Scan the inbox once; report accepted, duplicates, quarantined."""

    def train(self, snapshot: str | None = None, max_steps: int | None = None, emit: Emit = ignore,
              run_id: str | None = None) -> str:
        """Cut (or reuse) a snapshot and train an adapter; return the run id. With the
        id of an interrupted run, resume it from its last checkpoint."""

    def export(self, run: str, quant: str | None = None, emit: Emit = ignore) -> ModelVersion:
        """Merge, convert, quantize and parity-check a run; register it as a new (not current) version."""

    def models(self) -> list[ModelVersion]: ...

    def promote(self, version: str) -> None: ...

    def rollback(self) -> str: ...


def open_engine(home: Path) -> Engine:
    """The in-process engine for a home (heavy modules load only when a stage runs)."""
    from .engine import LocalEngine

    return LocalEngine(home)
