"""The ``appliance`` command (architecture.md, "The command line": a contract).

Every command takes --home; reporting commands take --json and then print one JSON
object on stdout. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import ApplianceError
from .paths import resolve_home

NOT_YET = {
    "eval": "the promotion gate report",
    "run": "the daemon",
    "forget": "forgetting a document",
    "audit": "the audit chain",
    "tui": "the terminal app",
}


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # everything the appliance writes is private to its user (R12)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's concern
    warnings.filterwarnings("ignore", category=UserWarning, module="(torch|transformers|peft|bitsandbytes)")
    # bitsandbytes warns that its optional hub-fetched CPU kernel package ('kernels') is
    # absent. It is deliberately never installed: it would download code from a hub.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except ApplianceError as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="A private fine-tuning appliance. Offline.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(name: str, func: Callable[[argparse.Namespace], int | None], help: str,
                json_flag: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--home", help="the appliance home (default: $APPLIANCE_HOME or the user's data folder)")
        if json_flag:
            p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(func=func)
        return p

    p = command("init", cmd_init, "create a home and config; import a base model (HF folder or .gguf)")
    p.add_argument("--base", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), a .gguf file or an HF folder")
    command("ingest", cmd_ingest, "scan the inbox once; report accepted / duplicate / quarantined", json_flag=True)
    p = command("train", cmd_train, "train an adapter on a snapshot of the data", json_flag=True)
    p.add_argument("--snapshot", help="snapshot id (default: cut one from the current data)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--run", help="run id: resume this run from its last checkpoint (default: a new run)")
    p = command("export", cmd_export, "merge + convert + quantize + parity check; register a new version", json_flag=True)
    p.add_argument("run", help="run id printed by 'appliance train'")
    p.add_argument("--quant", choices=["auto", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"],
                   help="auto (default from config): the smallest type that keeps quality against f16")
    p.add_argument("--adapter", action="store_true",
                   help="also write the adapter as a GGUF LoRA (runs/RUN/gguf/adapter-f16.gguf), checked against "
                        "the merged model")
    command("models", cmd_models, "list model versions", json_flag=True)
    p = command("promote", cmd_promote, "make a version the one the endpoint serves as 'appliance'")
    p.add_argument("version")
    command("rollback", cmd_rollback, "serve the previously promoted version again")
    p = command("serve", cmd_serve, "serve the current version in the foreground")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    command("status", cmd_status, "current model, data and endpoint", json_flag=True)
    p = command("demo", cmd_demo, "the whole loop on the embedded default model and the bundled sample data",
                json_flag=True)
    p.add_argument("--port", type=int, help="endpoint port (default 8088)")
    p.add_argument("--no-wait", action="store_true", help="stop the endpoint and exit after the comparison")
    for name, what in NOT_YET.items():
        p = command(name, cmd_not_yet, f"({what}: not in this version yet)")
        p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
        p.set_defaults(command_name=name)
    return parser


# --- helpers -------------------------------------------------------------------------


def _home(args: argparse.Namespace) -> Path:
    return resolve_home(args.home)


def _engine(args: argparse.Namespace) -> Any:
    from .api import open_engine

    return open_engine(_home(args))


def _emit(args: argparse.Namespace):
    from .console import ProgressDisplay

    return ProgressDisplay(enabled=not getattr(args, "json", False))


def _print_json(obj: Any) -> None:
    from .engine import as_dict

    print(json.dumps(as_dict(obj), sort_keys=True, default=str))


# --- commands ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from .init import init

    home = _home(args)
    with _emit(args) as show:
        init(home, args.base, show)
    print(f"appliance home ready: {home}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    engine = _engine(args)
    with _emit(args) as show:
        report = engine.ingest(show)
    if args.json:
        _print_json(report)
    else:
        print(f"accepted {report['accepted']} records from {report['files']} file(s); "
              f"{report['duplicates']} duplicate(s); {report['unchanged']} unchanged; {report['ignored']} ignored")
        if report["skipped"]:
            print(f"skipped {report['skipped']} invalid line(s) in kept files, e.g. {report['skipped_lines'][0]}")
        for name in report["superseded"]:
            print(f"superseded the earlier version of {name}")
        for q in report["quarantined"]:
            print(f"quarantined {q['file']}: {'; '.join(q['reasons'][:3])}")
        for note in report["waiting"] + report["failed"]:
            print(f"left in the inbox {note['file']}: {note['reason']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    engine = _engine(args)
    with _emit(args) as show:
        run = engine.train(snapshot=args.snapshot, max_steps=args.max_steps, emit=show, run_id=args.run)
    if args.json:
        _print_json({"run": run})
    else:
        print(f"trained run {run}; next: appliance export {run}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    engine = _engine(args)
    with _emit(args) as show:
        version = engine.export(args.run, args.quant, show, adapter=args.adapter)
    if args.json:
        _print_json(version)
    else:
        print(f"registered version {version.version} ({version.quant}, {version.size / 1e6:.0f} MB); "
              f"next: appliance promote {version.version}")
        if args.adapter:
            print(f"adapter: runs/{args.run}/gguf/adapter-f16.gguf (apply it to the base's f16 GGUF)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    versions = _engine(args).models()
    if args.json:
        _print_json({"versions": versions})
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("version", "current", "quant", "size", "run", "snapshot")
    for v in versions:
        table.add_row(v.version, "*" if v.current else "", v.quant, f"{v.size / 1e6:.0f} MB", v.run or "-",
                      v.snapshot or "-")
    Console().print(table)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    _engine(args).promote(args.version)
    print(f"now serving {args.version} as 'appliance'")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    version = _engine(args).rollback()
    print(f"rolled back; now serving {version} as 'appliance'")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = _engine(args).status()
    if args.json:
        _print_json(status)
    else:
        print(f"home {status.home}\ncurrent model {status.current or '-'} ({status.versions} version(s))\n"
              f"data {status.documents} document(s), {status.records} record(s); {status.inbox_files} file(s) in the inbox\n"
              f"endpoint {status.endpoint}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load
    from .paths import Home
    from .serve import Server

    home = Home(_home(args))
    _engine(args)  # checks the home
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = Server(home, load(home.config), args.host, args.port)
    print(f"serving {home.root} on {server.url}/v1 (Ctrl-C to stop)", file=sys.stderr)
    server.serve_forever()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    home = Path(args.home).absolute() if args.home else Path.cwd() / "demo-home"
    summary = run_demo(home, port=args.port, wait=not args.no_wait, quiet=args.json)
    if args.json:
        _print_json(summary)
    return 0


def cmd_not_yet(args: argparse.Namespace) -> int:
    print(f"appliance: error: '{args.command_name}' is not available in this version yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
