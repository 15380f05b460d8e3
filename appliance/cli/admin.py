"""The commands for the people who run the appliance: the audit chain, human review and API keys."""

from __future__ import annotations

import argparse
import json
import sys
import time

from appliance.cli.common import engine_of, print_json
from appliance.contract.errors import ApplianceError
from appliance.home.keys import KeysError


def cmd_audit(args: argparse.Namespace) -> int:
    engine = engine_of(args)
    if args.action == "show":
        entries = engine.audit_entries()
        if args.json:
            print_json({"entries": entries})
        else:
            for e in entries:
                print(
                    f"{e.get('seq')} {e.get('at', 0):.0f} {e.get('user')} {e.get('action')} "
                    f"{json.dumps(e.get('details'), sort_keys=True)}"
                )
        return 0
    verdict = engine.verify_audit()
    if args.json:
        print_json(verdict)
    elif verdict["ok"]:
        print(f"audit chain intact: {verdict['entries']} entries")
    else:
        print(
            f"appliance: error: audit chain broken at line {verdict['bad_line']}: {verdict['reason']}", file=sys.stderr
        )
    return 0 if verdict["ok"] else 4


def cmd_review(args: argparse.Namespace) -> int:
    engine = engine_of(args)
    if args.action == "list":
        reviews = engine.reviews()
        if args.json:
            print_json({"reviews": reviews})
            return 0
        for r in reviews:
            print(
                f"run {r['run']} (job {r['job']}): {r['approvals']}/{r['approvals_needed']} approvals"
                f"{', you voted' if r['voted'] else ''}"
            )
            for item in r["items"]:
                print(
                    f"  [{item['index']}] Q: {item['question']}\n      A: {item['answer_a']}\n"
                    f"      B: {item['answer_b']}"
                )
        if not reviews:
            print("no candidate is waiting for review")
        return 0
    if not args.run:
        raise ApplianceError(f"appliance review {args.action}: name the candidate's run (see 'appliance review list')")
    preferences = {}
    for text in args.prefer:
        index, _, side = text.partition("=")
        if not index.strip().isdigit() or not side:
            raise ApplianceError(f"--prefer {text!r}: expected ITEM=a or ITEM=b, e.g. --prefer 0=a")
        preferences[int(index)] = side
    result = engine.vote(args.run, args.action == "approve", args.comment, preferences)
    if args.json:
        print_json(result)
    else:
        print(
            f"run {result['run']}: {result['state']} ({result['approvals']}/{result['approvals_needed']} "
            f"approvals); job {result['job']} {result['job_state']}; current model {result['current'] or '-'}"
        )
        for r in result["reveal"]:
            print(f"  [{r['index']}] A was {r['a']} ({r['a_is']}), B was {r['b']} ({r['b_is']})")
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    collections = [c.strip() for c in args.collections.split(",")] if args.collections is not None else None
    if collections is not None and not all(collections):
        raise KeysError(f"--collections {args.collections!r}: an empty name; write 'shared' for the top of the inbox")
    secret = engine_of(args).add_key(args.name, args.role, collections)
    shown = "every collection" if collections is None else ", ".join(collections)
    note = "this secret is shown once and stored only hashed; hand it to its holder now"
    if args.json:
        print_json({"name": args.name, "role": args.role, "collections": collections, "secret": secret, "note": note})
    else:
        print(f"key '{args.name}' (role {args.role}, {shown}); {note}:", file=sys.stderr)
        print(secret)  # alone on stdout, so '> file' keeps just the secret
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = engine_of(args).keys()
    if args.json:
        print_json({"keys": keys})
        return 0

    def when(t: float | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"

    for k in keys:
        shown = "all" if k["collections"] is None else ",".join(k["collections"])
        revoked = f"revoked {when(k['revoked'])}" if k["revoked"] else "active"
        print(f"{k['name']:<20} {k['role']:<11} {shown:<24} created {when(k['created'])}  {revoked}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    engine_of(args).revoke_key(args.name)
    print(f"revoked key '{args.name}': refused from the next command or request on")
    return 0


def cmd_keys_whoami(args: argparse.Namespace) -> int:
    me = engine_of(args).whoami()
    if args.json:
        print_json(me)
    else:
        shown = "every collection" if me["collections"] is None else ", ".join(me["collections"])
        print(f"key '{me['name']}', role {me['role']}, {shown}")
    return 0
