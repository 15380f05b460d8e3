"""One training process of a multi-process run (started by torchrun from training/launch.py; training/distributed.py says how ranks share the work).

``python -m appliance.training.rank <run>/launch.json``: joins the process group, trains its
share of the run with the same ``train()`` as a single process, and prints rank 0's events
on stdout for the parent to relay. SIGTERM asks for a stop at the next step (every rank
agrees on the step), with a checkpoint of the last complete one.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import traceback
from pathlib import Path

from appliance.contract.errors import ApplianceError
from appliance.contract.events import Event
from appliance.data.snapshot import load as load_snapshot
from appliance.home.config import Settings
from appliance.home.fsutil import read_json
from appliance.home.paths import Home
from appliance.training import distributed
from appliance.training.launch import EVENT_PREFIX, EXIT_INTERRUPTED, RANK_ERROR
from appliance.training.train import TrainInterrupted, train


def _print_event(event: Event) -> None:
    print(EVENT_PREFIX + json.dumps(event.to_dict()), flush=True)


def main(argv: list[str]) -> int:
    spec = read_json(Path(argv[0]))
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    home = Home(Path(spec["home"]), spec["collection"])
    settings = Settings.model_validate(spec["settings"])
    group = distributed.join()
    try:
        train(
            home,
            load_snapshot(home, spec["snapshot"]),
            settings,
            run_id=spec["run"],
            emit=_print_event if group.is_main else lambda _: None,
            stop=stopping.is_set,
            kind=spec["kind"],
            group=group,
        )
    except TrainInterrupted:
        return EXIT_INTERRUPTED
    except ApplianceError as exc:  # already one clear line
        print(f"rank {group.rank}{RANK_ERROR}{exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # a bug or a library's failure: the traceback for IT, then one line
        traceback.print_exc()
        print(f"rank {group.rank}{RANK_ERROR}{type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
