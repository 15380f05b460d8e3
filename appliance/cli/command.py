"""The ``appliance`` command (architecture.md, "The command line": a contract).

Every command takes --home; reporting commands take --json and then print one JSON
object on stdout. Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from appliance import __version__
from appliance.cli.admin import cmd_audit, cmd_keys_add, cmd_keys_list, cmd_keys_revoke, cmd_keys_whoami, cmd_review
from appliance.cli.common import collection_flag, engine_of, home_of, print_json, progress_for
from appliance.contract.api import open_engine
from appliance.contract.errors import ApplianceError
from appliance.contract.events import Message, StageFinished, StageStarted
from appliance.home.catalog import parse
from appliance.home.config import load
from appliance.home.keys import HOME_WIDE, authorize, caller_key, read_secret
from appliance.home.paths import Home


def main(argv: list[str] | None = None) -> int:
    os.umask(0o077)  # everything the appliance writes is private to its user (R12)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notes, not the user's concern
    warnings.filterwarnings("ignore", category=UserWarning, module="(torch|transformers|peft|bitsandbytes)")
    # bitsandbytes warns that its optional hub-fetched CPU kernel package ('kernels') is
    # absent, or, where it is installed, 'kernels' says it cannot check a hub while offline.
    # The appliance never fetches code from a hub; neither line is the user's concern.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        authorize_command(args)
        return args.func(args) or 0
    except ApplianceError as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("appliance: interrupted", file=sys.stderr)
        return 130


def help_exit(parser: argparse.ArgumentParser) -> int:
    """A command group run without its action: its help, and the usage-error exit code."""
    parser.print_help()
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="A private fine-tuning appliance. Offline.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND")

    def command(
        name: str,
        func: Callable[[argparse.Namespace], int | None],
        help: str,
        json_flag: bool = False,
        within: Any = None,
        group: str = "",
    ) -> argparse.ArgumentParser:
        p = (within or sub).add_parser(name, help=help, description=help)
        p.add_argument("--home", help="the appliance home (default: $APPLIANCE_HOME or the user's data folder)")
        p.add_argument(
            "--key-file",
            metavar="PATH",
            help="a file holding your API key (default: $APPLIANCE_API_KEY, else the home's api_key file)",
        )
        if json_flag:
            p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(func=func, role_command=f"{group} {name}" if group else name)
        return p

    p = command("init", cmd_init, "create a home and config; import a base model (HF folder or .gguf)")
    p.add_argument(
        "--base", default="embedded", help="'embedded' (SmolLM2-135M-Instruct), a .gguf file or an HF folder"
    )
    command("ingest", cmd_ingest, "scan the inbox once; report accepted / duplicate / quarantined", json_flag=True)
    p = command("train", cmd_train, "train an adapter on a snapshot of the data", json_flag=True)
    p.add_argument("--snapshot", help="snapshot id (default: cut one from the current data)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--run", help="run id: resume this run from its last checkpoint (default: a new run)")
    collection_flag(p)
    p = command(
        "export", cmd_export, "merge + convert + quantize + parity check; register a new version", json_flag=True
    )
    p.add_argument("run", help="run id printed by 'appliance train'")
    p.add_argument(
        "--quant",
        choices=["auto", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"],
        help="auto (default from config): the smallest type that keeps quality against f16",
    )
    p.add_argument(
        "--adapter",
        action="store_true",
        help="also write the adapter as a GGUF LoRA (runs/RUN/gguf/adapter-f16.gguf), checked against the merged model",
    )
    collection_flag(p)
    collection_flag(command("models", cmd_models, "list model versions", json_flag=True))
    p = command(
        "promote",
        cmd_promote,
        "make a version the one the endpoint serves as 'appliance' (or as 'appliance/COLLECTION')",
    )
    p.add_argument("version")
    collection_flag(p)
    collection_flag(command("rollback", cmd_rollback, "serve the previously promoted version again"))
    p = command("serve", cmd_serve, "serve the current version in the foreground")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    collection_flag(command("status", cmd_status, "current model, data and endpoint", json_flag=True))
    p = command(
        "ask",
        cmd_ask,
        "ask the current model a question through the endpoint; the answer cites the collection's documents",
        json_flag=True,
    )
    p.add_argument("question")
    p.add_argument("--no-grounding", action="store_true", help="the model alone: no passages, no sources")
    collection_flag(p)
    command(
        "collections",
        cmd_collections,
        "collections (inbox sub-folders): model id, current version, how it is served, data",
        json_flag=True,
    )
    p = command(
        "demo", cmd_demo, "the whole loop on the embedded default model and the bundled sample data", json_flag=True
    )
    p.add_argument("--port", type=int, help="endpoint port (default 8088)")
    p.add_argument("--no-wait", action="store_true", help="stop the endpoint and exit after the comparison")
    p.add_argument(
        "--data",
        type=Path,
        help="a folder with your own policies.jsonl (chat conversations) and probes.jsonl (questions with "
        "expected phrases) to run the demo on instead of the bundled clinic sample",
    )
    p = command("eval", cmd_eval, "the promotion gate: a run's candidate against the current model", json_flag=True)
    p.add_argument("run", help="run id")
    collection_flag(p)
    p = command("run", cmd_run, "the daemon: watch the inbox, retrain, gate, promote and serve")
    p.add_argument("--no-serve", action="store_true", help="do not start the endpoint in this process")
    p.add_argument("--once", action="store_true", help="ingest the inbox, run every queued job, then exit")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p = command("forget", cmd_forget, "remove a document everywhere and retrain without it", json_flag=True)
    p.add_argument("document", help="an inbox path, a file, or a document sha256")
    p = command("audit", cmd_audit, "the audit chain: 'verify' checks it, 'show' prints it", json_flag=True)
    p.add_argument("action", choices=["verify", "show"])
    p = command("retrain", cmd_retrain, "queue a training run on the current data (the daemon runs it)", json_flag=True)
    collection_flag(p)
    p = command("jobs", cmd_jobs, "the job journal: recent jobs and their stages", json_flag=True)
    collection_flag(
        command(
            "advise",
            cmd_advise,
            "the data advisor: warnings about the data and the latest run, in plain words",
            json_flag=True,
        )
    )
    p = command(
        "review",
        cmd_review,
        "human review before promotion: list waiting candidates, approve or reject one (as this OS user; audited)",
        json_flag=True,
    )
    p.add_argument("action", nargs="?", default="list", choices=["list", "approve", "reject"])
    p.add_argument("run", nargs="?", help="the candidate's run id (approve, reject)")
    p.add_argument("--comment", default="", help="why (recorded in the audit log)")
    p.add_argument(
        "--prefer",
        action="append",
        default=[],
        metavar="ITEM=a|b",
        help="the answer preferred on an item, e.g. --prefer 0=a (repeatable)",
    )
    keys = sub.add_parser(
        "keys",
        help="API keys with roles: add, list, revoke, whoami",
        description="API keys with roles (chat < contributor < approver < admin), optionally "
        "limited to collections; stored hashed",
    )
    keys.set_defaults(func=lambda _: help_exit(keys), role_command=None)
    actions = keys.add_subparsers(metavar="ACTION")
    p = command(
        "add",
        cmd_keys_add,
        "create a key and print its secret (once: it is stored only hashed)",
        json_flag=True,
        within=actions,
        group="keys",
    )
    p.add_argument("name", help="who holds it: letters, digits, '.', '_', '@', '-' (never reused)")
    p.add_argument("--role", required=True, choices=["chat", "contributor", "approver", "admin"])
    p.add_argument(
        "--collections",
        metavar="A,B",
        help="only these collections ('shared' = the top level of the inbox); default: every collection",
    )
    command(
        "list",
        cmd_keys_list,
        "every key: name, role, collections, created, revoked (never secrets)",
        json_flag=True,
        within=actions,
        group="keys",
    )
    p = command(
        "revoke",
        cmd_keys_revoke,
        "revoke a key: refused from the next command or request on",
        within=actions,
        group="keys",
    )
    p.add_argument("name")
    command(
        "whoami",
        cmd_keys_whoami,
        "the key this command runs with: name, role, collections",
        json_flag=True,
        within=actions,
        group="keys",
    )
    p = command("tui", cmd_tui, "the terminal app: dashboard, models, data, chat, activity")
    p.add_argument("--light", action="store_true", help="start in the light theme (ctrl+t switches)")
    return parser


# --- helpers -------------------------------------------------------------------------


def authorize_command(args: argparse.Namespace) -> None:
    """The one role check before any command runs (appliance/home/keys.py COMMAND_ROLES); the caller
    is --key-file, else $APPLIANCE_API_KEY, else the home's api_key file. A home that does not
    exist yet has no keys: ``init`` and ``demo`` create it, every other command then says so."""
    name = args.role_command if "role_command" in args else None
    if name in ("review", "audit"):
        name = f"{name} {args.action}"
    if name is None:
        return
    home = Home(_demo_home(args) if name == "demo" else home_of(args))
    if not home.is_initialised():
        return
    secret = read_secret(Path(args.key_file)) if getattr(args, "key_file", None) else None
    args.caller = caller_key(home, secret)
    collection = None if name in HOME_WIDE else parse(getattr(args, "collection", None) or "")
    authorize(name, args.caller, collection)


# --- commands ------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from appliance.cli.init import init

    home = home_of(args)
    with progress_for(args) as show:
        init(home, args.base, show)
    print(f"appliance home ready: {home}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    engine = engine_of(args)
    with progress_for(args) as show:
        report = engine.ingest(show)
    if args.json:
        print_json(report)
    else:
        print(
            f"accepted {report['accepted']} records from {report['files']} file(s); "
            f"{report['duplicates']} duplicate(s); {report['unchanged']} unchanged; {report['ignored']} ignored"
        )
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
    engine = engine_of(args)
    with progress_for(args) as show:
        run = engine.train(snapshot=args.snapshot, max_steps=args.max_steps, emit=show, run_id=args.run)
    if args.json:
        print_json({"run": run})
    else:
        print(f"trained run {run}; next: appliance export {run}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    engine = engine_of(args)
    with progress_for(args) as show:
        version = engine.export(args.run, args.quant, show, adapter=args.adapter)
    if args.json:
        print_json(version)
    else:
        print(
            f"registered version {version.version} ({version.quant}, {version.size / 1e6:.0f} MB); "
            f"next: appliance promote {version.version}"
        )
        if args.adapter:
            print(f"adapter: runs/{args.run}/gguf/adapter-f16.gguf (apply it to the base's f16 GGUF)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    versions = engine_of(args).models()
    if args.json:
        print_json({"versions": versions})
        return 0
    table = Table("version", "current", "quant", "size", "val loss", "docs", "run", "snapshot")
    for v in versions:
        loss = v.metrics.get("gate_val_loss") or v.metrics.get("best_val_loss")
        table.add_row(
            v.version,
            "*" if v.current else "",
            v.quant,
            f"{v.size / 1e6:.0f} MB",
            f"{loss:.3f}" if loss is not None else "-",
            str(v.metrics.get("documents") or "-"),
            v.run or "-",
            v.snapshot or "-",
        )
    Console().print(table)
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    engine_of(args).promote(args.version)
    print(f"now serving {args.version} as 'appliance'")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    version = engine_of(args).rollback()
    print(f"rolled back; now serving {version} as 'appliance'")
    return 0


def cmd_collections(args: argparse.Namespace) -> int:
    found = engine_of(args).collections()
    if args.json:
        print_json({"collections": found})
        return 0
    for c in found:
        served = f"{c['current']} ({c['mode']})" if c["current"] else f"no model yet (will be served {c['mode']})"
        print(
            f"{c['display']:<24} {c['model_id']:<32} {served}; {c['documents']} document(s), "
            f"{c['records']} record(s), {c['inbox_files']} file(s) in its inbox folder"
        )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = engine_of(args).status()
    if args.json:
        print_json(status)
    else:
        print(
            f"home {status.home}\ncurrent model {status.current or '-'} ({status.versions} version(s))\n"
            f"data {status.documents} document(s), {status.records} record(s); {status.inbox_files} file(s) in the inbox\n"
            f"endpoint {status.endpoint} ({status.server.get('health', '-')})"
        )
        if status.job:
            progress = status.job.get("progress") or {}
            done = f" {progress.get('completed')}/{progress.get('total')}" if progress.get("total") else ""
            print(f"job {status.job['id']} ({status.job['kind']}): {status.job['stage']}{done}")
        if status.queue:
            print(f"queued {', '.join(str(j['id']) for j in status.queue)}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    secret = read_secret(Path(args.key_file)) if args.key_file else None
    reply = engine_of(args).ask(args.question, grounding=not args.no_grounding, secret=secret)
    if args.json:
        print_json(reply)
        return 0
    print(reply["answer"].strip())
    grounding = reply.get("grounding") or {}
    if reply["sources"]:
        print("\nSources:")
        for s in reply["sources"]:
            excerpt = " ".join(s["passage"].split())
            print(f"  [{s['id']}] {s['document']}: {excerpt[:160]}{'…' if len(excerpt) > 160 else ''}")
    elif grounding.get("reason"):
        print(f"\n(answered from the model alone: {grounding['reason']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.serving.server import Server  # the web stack loads for the commands that serve

    home = Home(home_of(args))
    engine_of(args)  # checks the home
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    server = Server(home, load(home.config), args.host, args.port)
    print(f"serving {home.root} on {server.url}/v1 (Ctrl-C to stop)", file=sys.stderr)
    server.serve_forever()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.cli.demo import run_demo

    home = _demo_home(args)
    summary = run_demo(home, port=args.port, wait=not args.no_wait, quiet=args.json, data=args.data)
    if args.json:
        print_json(summary)
    return 0


def _demo_home(args: argparse.Namespace) -> Path:
    return Path(args.home).absolute() if args.home else Path.cwd() / "demo-home"


def cmd_eval(args: argparse.Namespace) -> int:
    engine = engine_of(args)
    with progress_for(args) as show:
        report = engine.evaluate(args.run, emit=show)
    if args.json:
        print_json(report)
    else:
        for check in report["checks"]:
            mark = {True: "pass", False: "FAIL", None: "n/a "}[check["passed"]]
            print(f"{mark}  {check['name']}: {check['detail']}")
        print(report["verdict"])
    return 0 if report["passed"] else 3


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.engine.daemon import Daemon

    home = home_of(args)
    engine_of(args)  # checks the home
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    daemon = Daemon(home, serve=not args.no_serve, once=args.once, host=args.host, port=args.port, emit=_log_event)
    return daemon.run()


def _log_event(event: Any) -> None:
    if isinstance(event, (Message, StageStarted, StageFinished)):
        text = getattr(event, "text", "") or getattr(event, "description", "") or getattr(event, "summary", "")
        if text:
            print(f"{event.stage}: {text}", file=sys.stderr, flush=True)


def cmd_forget(args: argparse.Namespace) -> int:
    report = engine_of(args).forget(args.document)
    if args.json:
        print_json(report)
    else:
        print(
            f"forgot document {report['document'][:16]}: {report['records_removed']} record(s) deleted, "
            f"{report['files_removed']} file(s), {len(report['runs_removed'])} run(s) removed, "
            f"versions retired: {', '.join(report['versions_retired']) or 'none'}"
        )
        if report["job"]:
            print(
                f"queued forget job {report['job']}: retrain without it, gate, promote, retire the rest "
                "('appliance run' runs it)"
            )
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    job = engine_of(args).retrain()
    if args.json:
        print_json(job)
    else:
        print(f"queued job {job['id']} ({job['state']})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = engine_of(args).jobs()
    if args.json:
        print_json({"jobs": jobs})
    else:
        for j in jobs:
            print(
                f"{j['id']:>4} {j['kind']:<7} {j['state']:<8} stage {j['stage'] or '-':<9} "
                f"run {j['run_id'] or '-'} version {j['version'] or '-'} {j['error'] or ''}"
            )
    return 0


def cmd_advise(args: argparse.Namespace) -> int:
    advice = engine_of(args).advise()
    if args.json:
        print_json({"advice": advice, "warnings": sum(a["level"] == "warning" for a in advice)})
    else:
        for a in advice:
            print(f"{'!' if a['level'] == 'warning' else ' '} {a['message']}")
    return 0


def cmd_tui(args: argparse.Namespace) -> int:
    """The terminal app on this home's engine; a running daemon is seen through the home's
    journal and event log, so the in-process engine attaches to it without a socket."""
    engine = open_engine(home_of(args), key=getattr(args, "caller", None))  # checks the home first
    if getattr(args, "key_file", None):
        # the TUI's chat talks to the endpoint with $APPLIANCE_API_KEY before the home's admin key
        # file: the window must chat as the key it was opened with (this process only)
        os.environ["APPLIANCE_API_KEY"] = read_secret(Path(args.key_file))
    # Only this command loads the front end, by name at run time: nothing in appliance/
    # imports textual or tui (tests/test_boundaries.py).
    app = importlib.import_module("tui.app")
    app.make_app(engine, theme=app.LIGHT if args.light else None).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
