"""What the command's handlers share: the home and engine a command acts on, its progress
display and its ``--json`` output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from appliance.cli.console import ProgressDisplay
from appliance.contract.api import open_engine
from appliance.engine.local import as_dict
from appliance.home.catalog import parse
from appliance.home.paths import resolve_home


def collection_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--collection",
        metavar="NAME",
        help="the collection (an inbox sub-folder, e.g. cardiology or "
        "legal/matter-17); default: shared, the top of the inbox",
    )


def home_of(args: argparse.Namespace) -> Path:
    return resolve_home(args.home)


def engine_of(args: argparse.Namespace) -> Any:
    return open_engine(
        home_of(args), key=getattr(args, "caller", None), collection=parse(getattr(args, "collection", None) or "")
    )


def progress_for(args: argparse.Namespace):
    return ProgressDisplay(enabled=not getattr(args, "json", False))


def print_json(obj: Any) -> None:
    print(json.dumps(as_dict(obj), sort_keys=True, default=str))
