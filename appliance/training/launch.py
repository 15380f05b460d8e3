"""The parent side of a multi-process run: start torchrun's ranks, relay their events, stop them.

The ranks are ``python -m appliance.training.rank`` (training/distributed.py says how they
share the work). A rank's stdout lines that start with EVENT_PREFIX are rank 0's progress
events; everything else the ranks and torchrun write goes to ``<run>/ranks.log``.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.contract.errors import TrainError
from appliance.contract.events import Emit, Message, from_dict, ignore
from appliance.data.snapshot import Snapshot
from appliance.home.config import Settings
from appliance.home.fsutil import write_json_atomic
from appliance.home.paths import Home
from appliance.training.distributed import processes
from appliance.training.train import TrainInterrupted, TrainResult, train

EVENT_PREFIX = "@appliance-event "  # rank 0's stdout lines that carry an event (other lines are logs)
RANK_ERROR = ": error: "  # in a rank's one-line error: "rank 1: error: <what went wrong>"
EXIT_INTERRUPTED = 3
# The ranks talk over the loopback interface only: the appliance's unit has no other network
# (systemd PrivateNetwork=yes), and nothing of a run may leave the machine. IT's own values win.
LOOPBACK = {
    key: os.environ.get(key, "lo") for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
}  # a rank's exit status when it stopped on request with a checkpoint written


def train_run(
    home: Home,
    snapshot: Snapshot,
    settings: Settings,
    run_id: str,
    kind: str = "train",
    emit: Emit = ignore,
    stop: Callable[[], bool] | None = None,
    max_steps: int | None = None,
) -> TrainResult:
    """Train run ``run_id`` however many processes the settings ask for: several through
    torchrun (this process relays their events, then reads the finished run back), else here."""
    if processes(settings) > 1:
        if max_steps:
            settings = settings.model_copy(update={"train": settings.train.model_copy(update={"max_steps": max_steps})})
        launch(home, snapshot.id, settings, run_id, kind, emit, stop)
    return train(home, snapshot, settings, run_id=run_id, max_steps=max_steps, emit=emit, stop=stop, kind=kind)


def launch(
    home: Home,
    snapshot_id: str,
    settings: Settings,
    run_id: str,
    kind: str,
    emit: Emit,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Train run ``run_id`` on ``processes(settings)`` processes; return when it is finished.

    A failed attempt (a rank killed, out of memory) is started again, all ranks resuming from
    rank 0's last checkpoint, up to ``[train] max_restarts`` times. Raises TrainInterrupted
    when ``stop`` turned true (the ranks wrote a checkpoint), and TrainError when the last
    attempt failed too (with the first failing rank's error line).
    """
    n = processes(settings)
    run = home.run(run_id)
    run.root.mkdir(parents=True, exist_ok=True)
    spec = run.launch_json
    write_json_atomic(
        spec,
        {
            "home": str(home.root),
            "collection": home.collection,
            "snapshot": snapshot_id,
            "run": run_id,
            "kind": kind,
            "settings": settings.model_dump(mode="json"),
        },
    )
    log_path = run.ranks_log
    for attempt in range(settings.train.max_restarts + 1):
        start = log_path.stat().st_size if log_path.exists() else 0  # each attempt appends
        code, stopped = _attempt(n, spec, log_path, emit, stop)
        if stopped:
            raise TrainInterrupted()
        if code == 0:
            return
        if attempt < settings.train.max_restarts:
            emit(
                Message(
                    "train",
                    f"a training process failed ({_first_error(log_path, start)}); restarting all {n} "
                    f"from the last checkpoint ({attempt + 1} of {settings.train.max_restarts})",
                    level="warning",
                )
            )
    raise TrainError(
        f"run {run_id}: training on {n} processes failed (exit {code}) after "
        f"{settings.train.max_restarts} restart(s): {_first_error(log_path, start)}; see {log_path}"
    )


def _attempt(n: int, spec: Path, log_path: Path, emit: Emit, stop: Callable[[], bool] | None) -> tuple[int, bool]:
    """One torchrun of ``n`` ranks to its end: (exit status, whether it was asked to stop).

    Restarts are a fresh torchrun each, not torchrun's own ``--max-restarts``: its elastic
    restart reuses the rendezvous store, and on this stack (torch 2.13, gloo) the restarted
    ranks could hang in ``init_process_group`` (seen in tests/test_distributed.py)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={n}",
        "--max-restarts=0",
        "-m",
        "appliance.training.rank",
        str(spec),
    ]
    with log_path.open("ab") as log:
        child = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,  # its own process group: stopping it reaches every rank
            preexec_fn=_die_with_parent,
            env={**os.environ, **LOOPBACK, "PYTHONUNBUFFERED": "1"},
        )
        stopped = _follow(child, emit, stop)
    return child.returncode, stopped


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In torchrun's process, before it starts: SIGTERM it when this process dies, even by
    SIGKILL (Linux's parent-death signal); torchrun then stops its ranks. Without it a killed
    worker would leave torchrun and the ranks training in their own session."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _follow(child: subprocess.Popen[str], emit: Emit, stop: Callable[[], bool] | None) -> bool:
    """Relay the ranks' events until torchrun exits; on ``stop``, ask every rank to stop.
    No process of the group outlives this call."""
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    reader = threading.Thread(target=_read_events, args=(child, events), daemon=True)
    reader.start()
    stopped = False
    try:
        while child.poll() is None:
            _drain(events, emit)
            if stop is not None and stop() and not stopped:
                stopped = True
                os.killpg(child.pid, signal.SIGTERM)  # the ranks checkpoint and exit; torchrun follows
            time.sleep(0.1)
        reader.join(timeout=5)
        _drain(events, emit)
    finally:
        _kill_group(child)
    return stopped


def _read_events(child: subprocess.Popen[str], events: queue.Queue[dict[str, Any]]) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith(EVENT_PREFIX):
            try:
                events.put(json.loads(line[len(EVENT_PREFIX) :]))
            except json.JSONDecodeError:
                continue  # a line cut by a dying rank: progress only, nothing is lost


def _drain(events: queue.Queue[dict[str, Any]], emit: Emit) -> None:
    while True:
        try:
            emit(from_dict(events.get_nowait()))
        except queue.Empty:
            return


def _kill_group(child: subprocess.Popen[str]) -> None:
    """SIGKILL whatever is left of torchrun's process group (a rank stuck in a collective)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def _first_error(log_path: Path, start: int) -> str:
    """The most telling line of the ranks' log: the first rank's own error line (training/rank.py
    writes one; the others then fail on the lost connection), else the last line naming an error."""
    with log_path.open("rb") as log:
        log.seek(start)
        text = log.read().decode(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    own = [line for line in lines if RANK_ERROR in line]
    if own:
        return own[0][:300]
    named = [line for line in lines if "rror" in line]
    return (named or lines or ["no output"])[-1][:300]
