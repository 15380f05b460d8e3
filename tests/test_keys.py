"""API keys with roles (issue 11): hashed storage, add/list/revoke, the role and collection
checks of every CLI command and engine method, migration of an old home, init's admin key.

Real files and the real command line (in-process ``appliance.cli.command.main`` for the role table,
a subprocess where another process matters)."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import command as cli
from appliance.cli.init import create_home
from appliance.contract.errors import AccessError
from appliance.engine.local import LocalEngine
from appliance.home import audit
from appliance.home.keys import (
    COMMAND_ROLES,
    HOME_WIDE,
    ROLES,
    Key,
    KeysError,
    KeyStore,
    authorize,
    caller_key,
    require,
)
from appliance.home.paths import Home

# A command line for every CLI command in COMMAND_ROLES (arguments only as far as parsing needs).
CLI_ARGV: dict[str, list[str]] = {
    "init": ["init"],
    "demo": ["demo", "--no-wait"],
    "status": ["status"],
    "models": ["models"],
    "jobs": ["jobs"],
    "tui": ["tui"],
    "ingest": ["ingest"],
    "retrain": ["retrain"],
    "advise": ["advise"],
    "eval": ["eval", "run-1"],
    "promote": ["promote", "v1"],
    "rollback": ["rollback"],
    "review list": ["review", "list"],
    "review approve": ["review", "approve", "run-1"],
    "review reject": ["review", "reject", "run-1"],
    "train": ["train"],
    "export": ["export", "run-1"],
    "serve": ["serve"],
    "run": ["run"],
    "forget": ["forget", "ab" * 32],
    "audit verify": ["audit", "verify"],
    "audit show": ["audit", "show"],
    "keys whoami": ["keys", "whoami"],
    "keys list": ["keys", "list"],
    "keys add": ["keys", "add", "zed", "--role", "chat"],
    "keys revoke": ["keys", "revoke", "zed"],
    "collections": ["collections"],
    "ask": ["ask", "when do visiting hours end?"],
}


def cli_commands() -> set[str]:
    """Every command name the real parser dispatches (with the actions that need their own role)."""
    names: set[str] = set()

    def walk(parser: argparse.ArgumentParser) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)
        command = parser.get_default("role_command")
        if command in ("review", "audit"):
            action = next(a for a in parser._actions if a.dest == "action")
            names.update(f"{command} {choice}" for choice in action.choices)
        elif command:
            names.add(command)

    walk(cli.build_parser())
    return names


def engine_methods() -> set[str]:
    return {n for n, m in vars(LocalEngine).items() if not n.startswith("_") and inspect.isfunction(m)}


def one_lower(role: str) -> str | None:
    i = ROLES.index(role)
    return ROLES[i - 1] if i else None


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APPLIANCE_API_KEY", raising=False)


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    """An initialised home (no base model: the key checks come before any stage)."""
    return create_home(tmp_path / "home", "tiny")


def key_file(home: Home, role: str, collections: list[str] | None = None, name: str | None = None) -> Path:
    secret = KeyStore(home).add(name or f"{role}-key", role, collections)
    path = home.root.parent / f"{name or role}.key"
    path.write_text(secret + "\n")
    return path


@pytest.fixture()
def ran(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace every command's body with a recorder: which commands got past the check."""
    calls: list[str] = []
    for name in dir(cli):
        if name.startswith("cmd_"):
            monkeypatch.setattr(cli, name, lambda args, name=name: calls.append(name) or 0)
    return calls


# --- the table ----------------------------------------------------------------------------


def test_every_cli_command_and_engine_method_has_a_role():
    assert cli_commands() == set(CLI_ARGV)
    assert cli_commands() <= set(COMMAND_ROLES)
    assert engine_methods() <= set(COMMAND_ROLES), engine_methods() - set(COMMAND_ROLES)
    assert set(COMMAND_ROLES.values()) <= set(ROLES)
    for name in engine_methods():  # the decorator wrapped each one with the table's role
        assert getattr(LocalEngine, name).required_role == COMMAND_ROLES[name], name


# --- storage -------------------------------------------------------------------------------


def test_secrets_are_stored_hashed_and_never_logged(home: Home):
    store = KeyStore(home)
    secret = store.add("alice@clinic", "approver", ["cardiology", "shared"])
    assert len(secret) >= 43  # 256 random bits
    text = home.keys.read_text()
    assert secret not in text and secret not in home.audit_log.read_text()
    assert home.keys.stat().st_mode & 0o777 == 0o600
    entry = next(e for e in json.loads(text)["keys"] if e["name"] == "alice@clinic")
    assert entry["collections"] == ["cardiology", ""] and len(entry["sha256"]) == 64
    listed = {k["name"]: k for k in store.list()}
    assert listed["alice@clinic"]["collections"] == ["cardiology", "shared"]
    assert all(set(k) == {"name", "role", "collections", "created", "revoked"} for k in listed.values())
    assert KeyStore(home).authenticate(secret) == Key("alice@clinic", "approver", ("cardiology", ""))
    assert KeyStore(home).authenticate(secret[:-1] + "x") is None
    adds = audit.find(home, "key_add")
    assert adds[-1]["details"] == {"key": "alice@clinic", "role": "approver", "collections": ["cardiology", "shared"]}


@pytest.mark.parametrize("name", ["", "-bob", "bob smith", "a" * 65, "b/c"])
def test_bad_names_are_refused(home: Home, name: str):
    with pytest.raises(KeysError, match="key name"):
        KeyStore(home).add(name, "chat")


def test_names_are_unique_roles_known_and_admins_see_everything(home: Home):
    store = KeyStore(home)
    store.add("bob", "chat")
    with pytest.raises(KeysError, match="exists already"):
        store.add("bob", "admin")
    with pytest.raises(KeysError, match="role 'root'"):
        store.add("carol", "root")
    with pytest.raises(KeysError, match="admin key sees every collection"):
        store.add("carol", "admin", ["legal"])
    with pytest.raises(KeysError, match="collection '../x'"):
        store.add("carol", "chat", ["../x"])


def test_init_key_is_the_admin_key(home: Home):
    key = caller_key(home)
    assert key == Key("admin", "admin", None)
    assert [k["name"] for k in KeyStore(home).list()] == ["admin"]
    assert audit.entries(home) == []  # creating a home is not a change to its keys


def test_an_old_home_is_migrated_on_first_use(tmp_path: Path):
    root = tmp_path / "old"
    home = create_home(root, "tiny")
    home.keys.unlink()  # as a home made before keys existed
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "keys", "whoami", "--home", str(root), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "APPLIANCE_API_KEY": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"name": "admin", "role": "admin", "collections": None}
    assert home.keys.stat().st_mode & 0o777 == 0o600
    assert home.api_key.read_text().strip() not in home.keys.read_text()
    migrated = audit.find(home, "key_add")
    assert len(migrated) == 1 and migrated[0]["details"]["migrated"] is True


def test_the_last_admin_key_cannot_be_revoked(home: Home):
    store = KeyStore(home)
    with pytest.raises(KeysError, match="last admin key"):
        store.revoke("admin")
    store.add("second", "admin")
    store.revoke("admin")
    with pytest.raises(KeysError, match="last admin key"):
        store.revoke("second")
    with pytest.raises(KeysError, match="no key named 'nobody'"):
        store.revoke("nobody")
    assert caller_key(home, KeyStore(home).add("third", "admin")).name == "third"
    with pytest.raises(AccessError, match="unknown or revoked"):
        caller_key(home)  # the api_key file holds the revoked "admin" secret


def test_a_revoked_key_is_refused_on_the_next_call(home: Home):
    secret = KeyStore(home).add("bob", "contributor")
    server_side = KeyStore(home)  # a long-lived process (the endpoint): its cache must notice
    assert server_side.authenticate(secret).name == "bob"
    engine = LocalEngine(home.root, key=caller_key(home, secret))
    assert engine.whoami()["name"] == "bob"
    proc = subprocess.run(
        [sys.executable, "-m", "appliance", "keys", "revoke", "bob", "--home", str(home.root)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "APPLIANCE_API_KEY": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert server_side.authenticate(secret) is None
    with pytest.raises(AccessError, match="revoked"):
        engine.whoami()
    listed = {k["name"]: k for k in KeyStore(home).list()}
    assert listed["bob"]["revoked"] is not None and listed["admin"]["revoked"] is None
    assert audit.find(home, "key_revoke")[-1]["details"] == {"key": "bob", "role": "contributor"}


def test_keys_add_prints_the_secret_once_and_it_works(home: Home, tmp_path: Path, capsys: pytest.CaptureFixture):
    assert (
        cli.main(
            [
                "keys",
                "add",
                "dana",
                "--role",
                "approver",
                "--collections",
                "cardiology, shared",
                "--home",
                str(home.root),
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    secret = out.out.strip()
    assert "shown once" in out.err and secret not in out.err
    (tmp_path / "dana.key").write_text(secret)
    assert (
        cli.main(["keys", "whoami", "--json", "--home", str(home.root), "--key-file", str(tmp_path / "dana.key")]) == 0
    )
    assert json.loads(capsys.readouterr().out) == {
        "name": "dana",
        "role": "approver",
        "collections": ["cardiology", "shared"],
    }
    assert cli.main(["keys", "list", "--json", "--home", str(home.root)]) == 0
    listed = capsys.readouterr().out
    assert secret not in listed and {k["name"] for k in json.loads(listed)["keys"]} == {"admin", "dana"}


def test_the_environment_key_is_used_and_a_wrong_one_refused(
    home: Home, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("APPLIANCE_API_KEY", KeyStore(home).add("erin", "chat"))
    assert cli.main(["keys", "whoami", "--home", str(home.root)]) == 0
    assert "key 'erin', role chat" in capsys.readouterr().out
    monkeypatch.setenv("APPLIANCE_API_KEY", "not-a-key")
    assert cli.main(["status", "--home", str(home.root)]) == 5
    assert capsys.readouterr().err.strip() == (
        "appliance: error: the API key is unknown or revoked; ask an admin for a key ('appliance keys add')"
    )


# --- the role of every command ---------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(CLI_ARGV))
def test_every_command_refuses_a_key_one_role_too_low(
    command: str, home: Home, ran: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    role = COMMAND_ROLES[command]
    argv = CLI_ARGV[command] + ["--home", str(home.root)]
    if (lower := one_lower(role)) is not None:
        code = cli.main(argv + ["--key-file", str(key_file(home, lower))])
        err = capsys.readouterr().err.strip()
        assert code == 5 and ran == [], err
        assert err == (
            f"appliance: error: key '{lower}-key' (role {lower}) may not run '{command}': it needs the {role} role"
        )
    assert cli.main(argv + ["--key-file", str(key_file(home, role, name=f"{role}-ok"))]) == 0, capsys.readouterr()
    assert len(ran) == 1  # the right role got past the check, to the command itself


@pytest.mark.parametrize("method", sorted(engine_methods()))
def test_every_engine_method_refuses_a_key_one_role_too_low(method: str, home: Home):
    role = COMMAND_ROLES[method]
    lower = one_lower(role)
    params = [
        p
        for p in inspect.signature(getattr(LocalEngine, method)).parameters.values()
        if p.name != "self" and p.default is inspect.Parameter.empty
    ]
    if lower is None:  # open to every role: then a key for another collection is what is refused
        if method in HOME_WIDE:
            pytest.skip(f"{method} is open to every key (it checks no collection, or the one it is asked for)")
        message = "^no collection 'shared'$"
        secret = KeyStore(home).add("low", "chat", ["cardiology"])
    else:
        message = f"may not run '{method}': it needs the {role} role"
        secret = KeyStore(home).add("low", lower)
    engine = LocalEngine(home.root, key=caller_key(home, secret))
    before = home.audit_log.read_text()
    with pytest.raises(AccessError, match=message):
        getattr(engine, method)(*["x"] * len(params))
    assert home.audit_log.read_text() == before  # nothing was done, not even a refused attempt's side effects


def test_a_refused_command_does_nothing_and_the_right_role_does_it(home: Home, capsys: pytest.CaptureFixture):
    argv = ["retrain", "--json", "--home", str(home.root), "--key-file"]
    assert cli.main(argv + [str(key_file(home, "chat"))]) == 5
    assert "needs the contributor role" in capsys.readouterr().err
    assert LocalEngine(home.root).jobs() == []
    assert cli.main(argv + [str(key_file(home, "contributor"))]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "train"
    assert [j["kind"] for j in LocalEngine(home.root).jobs()] == ["train"]


def test_light_engine_methods_run_for_the_right_role(home: Home):
    chat = LocalEngine(home.root, key=caller_key(home, KeyStore(home).add("c", "chat")))
    assert chat.status().current is None and chat.models() == [] and chat.jobs() == []
    assert chat.whoami() == {"name": "c", "role": "chat", "collections": None}
    admin = LocalEngine(home.root)
    assert {k["name"] for k in admin.keys()} == {"admin", "c"}
    secret = admin.add_key("f", "approver")
    assert caller_key(home, secret).role == "approver"
    admin.revoke_key("f")
    assert admin.verify_audit()["ok"]


def test_require_and_authorize():
    bob = Key("bob", "contributor", ("legal/matter-17",))
    require(bob, "chat", "legal/matter-17")
    require(bob, "contributor")
    authorize("ingest", bob, "legal/matter-17")
    with pytest.raises(
        AccessError, match="^key 'bob' \\(role contributor\\) may not run 'promote': it needs the approver role$"
    ):
        authorize("promote", bob, "legal/matter-17")
    assert all(Key("root", "admin").can(r) for r in ROLES)
    assert not Key("c", "chat").can("contributor")


# --- collections ------------------------------------------------------------------------------


def test_a_collection_key_is_refused_elsewhere_without_a_hint(home: Home, capsys: pytest.CaptureFixture):
    for c in ("legal/matter-17", "legal/matter-18", "cardiology"):
        (home.inbox / c).mkdir(parents=True)
    secret = KeyStore(home).add("lawyer", "contributor", ["legal/matter-17"])
    key = caller_key(home, secret)
    engine = LocalEngine(home.root, key=key)
    assert [c["name"] for c in engine.collections()] == ["legal/matter-17"]
    assert engine.scoped("legal/matter-17").status().documents == 0
    refusals = []
    for target in ("legal/matter-18", "no-such-collection"):
        with pytest.raises(AccessError) as info:
            engine.scoped(target)
        refusals.append(str(info.value))
        with pytest.raises(AccessError):
            LocalEngine(home.root, target, key=key).ingest()
    assert refusals == ["no collection 'legal/matter-18'", "no collection 'no-such-collection'"]
    for message in refusals:  # never a hint of what exists or what the key may see
        assert "matter-17" not in message and "cardiology" not in message and "lawyer" not in message
    with pytest.raises(AccessError, match="^no collection 'shared'$"):
        engine.status()  # the unscoped engine is the shared collection, not this key's
    with pytest.raises(AccessError, match="^no collection 'legal/matter-18'$"):
        authorize("status", key, "legal/matter-18")
    assert KeyStore(home).add("front-desk", "chat", [""])  # the engine API's form of "shared"
    assert (
        cli.main(["keys", "add", "nobody", "--role", "chat", "--collections", "legal,", "--home", str(home.root)]) == 1
    )
    assert "an empty name; write 'shared'" in capsys.readouterr().err
    lawyer = home.root.parent / "lawyer.key"
    lawyer.write_text(secret)
    assert cli.main(["status", "--home", str(home.root), "--key-file", str(lawyer)]) == 5
    assert capsys.readouterr().err.strip() == "appliance: error: no collection 'shared'"


# --- the store under load -----------------------------------------------------------------------


def test_authenticate_reads_the_file_only_when_it_changed(home: Home, monkeypatch: pytest.MonkeyPatch):
    secret = KeyStore(home).add("bob", "chat")
    reads = []
    real_read = KeyStore._read
    monkeypatch.setattr(KeyStore, "_read", staticmethod(lambda path: reads.append(path) or real_read(path)))
    store = KeyStore(home)
    assert all(store.authenticate(secret) for _ in range(200)) and len(reads) == 1
    KeyStore(home).add("carol", "chat")  # another writer: new inode, new size
    before = len(reads)
    assert store.authenticate(secret).name == "bob" and len(reads) == before + 1
    assert store.authenticate(secret).name == "bob" and len(reads) == before + 1


def test_concurrent_adds_from_several_processes_all_land(home: Home):
    script = (
        "import sys; from appliance.home.keys import KeyStore; s = KeyStore(sys.argv[1]); "
        "[s.add(f'{sys.argv[2]}-{i}', 'chat') for i in range(5)]"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(home.root), f"p{n}"]) for n in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    names = {k["name"] for k in KeyStore(home).list()}
    assert names == {"admin"} | {f"p{n}-{i}" for n in range(4) for i in range(5)}
    assert audit.verify(home).ok and len(audit.find(home, "key_add")) == 20


def test_audit_entries_name_the_key_an_engine_call_acted_for(tmp_path):
    from appliance.cli.init import create_home
    from appliance.engine.local import LocalEngine
    from appliance.home import audit
    from appliance.home.keys import KeyStore

    home = create_home(tmp_path / "home", "tiny")
    secret = KeyStore(home).add("dr-lee", "contributor")
    engine = LocalEngine(home.root, key=KeyStore(home).authenticate(secret))
    engine.retrain()
    entry = [e for e in audit.entries(home) if e["action"] == "retrain_requested"][-1]
    assert entry["details"]["key"] == "dr-lee"
    assert audit.verify(home).ok
