"""The home directory layout, defined once (see architecture.md, "The home directory").

Everything that names a file inside a home goes through :class:`Home`; no other
module joins path strings for the home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSTEM_HOME = Path("/var/lib/appliance")


def resolve_home(explicit: str | os.PathLike[str] | None = None) -> Path:
    """--home, else APPLIANCE_HOME, else the system home if readable, else the user's."""
    if explicit:
        return Path(explicit).expanduser().absolute()
    env = os.environ.get("APPLIANCE_HOME")
    if env:
        return Path(env).expanduser().absolute()
    if (SYSTEM_HOME / "config.toml").exists() and os.access(SYSTEM_HOME, os.R_OK | os.X_OK):
        return SYSTEM_HOME
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "appliance"


QUARANTINE_REASON = ".reason.json"


def quarantine_reason(quarantined: Path) -> Path:
    """The sidecar beside a quarantined file that says why it is there."""
    return quarantined.with_name(quarantined.name + QUARANTINE_REASON)


def base_meta_file(folder: Path) -> Path:
    """Where a base folder (or its staging copy) says it was imported from; written last by the
    import, so its presence marks a complete base."""
    return folder / "meta.json"


@dataclass(frozen=True)
class Home:
    """A home, or one collection's view of it (``collection`` is "" for the shared one).

    A collection (a sub-folder of the inbox, see appliance/home/catalog.py) has its own
    inbox folder, quarantine, store, snapshots, runs and models under
    ``collections/<name>/``; configuration, keys, the job journal, the audit log, probes,
    base models, logs and run/ are the home's, the same in every scope. The shared
    collection keeps the top-level layout of architecture.md unchanged.
    """

    root: Path
    collection: str = ""

    def scoped(self, collection: str) -> Home:
        """The same home seen from ``collection`` ("" is the shared collection)."""
        return Home(self.root, collection)

    @property
    def top(self) -> Home:
        return Home(self.root)

    @property
    def _data(self) -> Path:
        """Where this scope's own data lives: the home itself for the shared collection."""
        return self.root / "collections" / self.collection if self.collection else self.root

    @property
    def collections_dir(self) -> Path:
        return self.root / "collections"

    # --- top-level files -------------------------------------------------
    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def api_key(self) -> Path:
        return self.root / "api_key"

    @property
    def keys(self) -> Path:
        """API keys with roles (hashed; appliance/home/keys.py)."""
        return self.root / "keys.json"

    @property
    def jobs_db(self) -> Path:
        return self.root / "jobs.db"

    @property
    def audit_log(self) -> Path:
        return self.root / "audit.log"

    @property
    def holds(self) -> Path:
        """Legal holds: one ``sha256 reason`` a line; such documents cannot be forgotten."""
        return self.root / "holds.txt"

    # --- folders -------------------------------------------------------------
    @property
    def inbox(self) -> Path:
        return self.root / "inbox" / self.collection if self.collection else self.root / "inbox"

    @property
    def probes(self) -> Path:
        return self.root / "probes"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine" / self.collection if self.collection else self.root / "quarantine"

    @property
    def store(self) -> Path:
        return self._data / "store"

    @property
    def snapshots(self) -> Path:
        return self._data / "snapshots"

    @property
    def bases(self) -> Path:
        return self.root / "base"

    @property
    def runs(self) -> Path:
        return self._data / "runs"

    @property
    def models(self) -> Path:
        return self._data / "models"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def rundir(self) -> Path:
        return self.root / "run"

    def folders(self) -> list[Path]:
        return [
            self.inbox,
            self.probes,
            self.quarantine,
            self.store,
            self.snapshots,
            self.bases,
            self.runs,
            self.models,
            self.logs,
            self.rundir,
        ]

    # --- per-item paths --------------------------------------------------------
    @property
    def store_db(self) -> Path:
        return self.store / "index.db"

    @property
    def texts(self) -> Path:
        """Documents' extracted text (what ingest chunked), by sha256, for the study stage."""
        return self.store / "texts"

    @property
    def passage_index(self) -> Path:
        """The collection's passage index (SQLite FTS5): what grounded answers retrieve from."""
        return self.store / "passages.db"

    def document_text(self, sha256: str) -> Path:
        return self.texts / f"{sha256}.txt"

    @property
    def study(self) -> Path:
        """Study material generated from each document (appliance/data/study/stage.py), by sha256."""
        return self.store / "study"

    def study_cache(self, sha256: str) -> Path:
        return self.study / f"{sha256}.json"

    def base(self, name: str) -> Path:
        return self.bases / name

    def base_meta(self, name: str) -> Path:
        return base_meta_file(self.base(name))

    def snapshot(self, snapshot_id: str) -> Path:
        return self.snapshots / snapshot_id

    def manifest(self, snapshot_id: str) -> Path:
        return self.snapshot(snapshot_id) / "manifest.json"

    def run(self, run_id: str) -> RunDir:
        return RunDir(self.runs / run_id)

    def model(self, version: str) -> Path:
        return self.models / version

    def version_json(self, version: str) -> Path:
        """The version's record (its file's sha256 and how it was made); present once it is complete."""
        return self.model(version) / "version.json"

    def lineage(self, version: str) -> Path:
        return self.model(version) / "lineage.json"

    def model_card(self, version: str) -> Path:
        return self.model(version) / "README.md"

    @property
    def history(self) -> Path:
        """Promotions and rollbacks, newest last."""
        return self.models / "history.json"

    @property
    def retired(self) -> Path:
        return self.models / "retired.json"

    @property
    def current(self) -> Path:
        """A symlink to models/<version>; replaced atomically on promotion."""
        return self.models / "current"

    @property
    def lock(self) -> Path:
        return self.rundir / "engine.lock"

    @property
    def events_log(self) -> Path:
        """Events the daemon writes (JSON lines); other processes tail it."""
        return self.logs / "events.jsonl"

    @property
    def daemon_state(self) -> Path:
        """The running daemon's pid, endpoint address and watcher counters (rewritten atomically)."""
        return self.rundir / "daemon.json"

    def is_initialised(self) -> bool:
        return self.config.is_file()


@dataclass(frozen=True)
class RunDir:
    """runs/<id>/: adapter, checkpoints, merged, gguf, and train.json, method.json, heldout.json,
    parity.json, eval.json, review.json, meta.json."""

    root: Path

    @property
    def id(self) -> str:
        return self.root.name

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def adapter_weights(self) -> Path:
        return self.adapter / "adapter_model.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    @staticmethod
    def checkpoint_state(checkpoint: Path) -> Path:
        """A checkpoint's ``state.json``, written last: a checkpoint without it is incomplete."""
        return checkpoint / "state.json"

    @staticmethod
    def checkpoint_weights(checkpoint: Path) -> Path:
        """The trained tensors (an adapter's, or every weight for full fine-tuning)."""
        return checkpoint / "adapter.safetensors"

    @staticmethod
    def checkpoint_trainer(checkpoint: Path) -> Path:
        """Optimizer, scheduler and random-number states."""
        return checkpoint / "trainer.pt"

    def checkpoint_dirs(self) -> list[Path]:
        """Complete checkpoints, oldest first (staging folders are hidden until renamed into place)."""
        if not self.checkpoints.is_dir():
            return []
        found = [p for p in self.checkpoints.glob("step-*") if self.checkpoint_state(p).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    @property
    def train_json(self) -> Path:
        """What training did (snapshot, steps, losses); written when training completes."""
        return self.root / "train.json"

    @property
    def heldout(self) -> Path:
        """The study questions held out of this run's training, per document, for the gate's recall."""
        return self.root / "heldout.json"

    @property
    def method_json(self) -> Path:
        """The method chosen for the run, kept so a resumed run does not switch."""
        return self.root / "method.json"

    @property
    def plan_json(self) -> Path:
        """Incremental or full, and why (training/incremental.py), kept so a resumed run replays the same sample."""
        return self.root / "plan.json"

    @property
    def launch_json(self) -> Path:
        """What the processes of a multi-process run are given (training/launch.py)."""
        return self.root / "launch.json"

    @property
    def ranks_log(self) -> Path:
        """What torchrun and the ranks of a multi-process run wrote (errors, tracebacks)."""
        return self.root / "ranks.log"

    @property
    def review(self) -> Path:
        return self.root / "review.json"

    @property
    def review_lock(self) -> Path:
        return self.root / ".review.lock"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"

    @property
    def parity(self) -> Path:
        return self.root / "parity.json"

    @property
    def eval(self) -> Path:
        return self.root / "eval.json"

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"
