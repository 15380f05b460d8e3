"""``appliance demo``: the whole loop on the embedded default model and the sample data.

fresh home -> embedded base (exported as version ``base``) -> sample conversations into
the inbox -> ingest -> train -> export -> promote -> serve -> the probe questions asked
of ``base`` and the tuned version through the real endpoint, side by side.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from appliance.cli.console import ProgressDisplay
from appliance.cli.init import init
from appliance.contract.errors import HomeError
from appliance.engine.local import LocalEngine
from appliance.home import registry
from appliance.home.config import Settings
from appliance.home.paths import Home
from appliance.quality import probes
from appliance.serving.guard import check_bind, read_api_key
from appliance.serving.server import Server

MARKER = ".appliance-demo"


def sample_data() -> Path:
    """examples/clinic in a source checkout, or where the wheel installs it."""
    for folder in (
        Path(__file__).resolve().parents[2] / "examples" / "clinic",
        Path(sys.prefix) / "share" / "appliance" / "examples" / "clinic",
    ):
        if (folder / "policies.jsonl").exists():
            return folder
    raise HomeError("the sample data (examples/clinic) is missing from this installation")


def sample_folder(folder: Path) -> Path:
    """A folder given with ``--data``: it must hold the two files the demo reads."""
    for name in ("policies.jsonl", "probes.jsonl"):
        if not (folder / name).is_file():
            raise HomeError(f"{folder / name}: missing; --data needs policies.jsonl and probes.jsonl")
    return folder.absolute()


def fresh_home(root: Path) -> None:
    if root.exists():
        if not (root / MARKER).exists() and any(root.iterdir()):
            raise HomeError(f"{root}: exists and is not a demo home; pass --home with a new folder")
        shutil.rmtree(root)
    root.mkdir(parents=True, mode=0o700)
    (root / MARKER).write_text("created by 'appliance demo'; removed by the next demo run\n")


def run_demo(
    root: Path, port: int | None = None, wait: bool = True, quiet: bool = False, data: Path | None = None
) -> dict[str, Any]:
    """The demo on ``data`` (a folder like examples/clinic), by default the bundled sample;
    always with a fresh home's default settings."""
    console = Console(stderr=True, quiet=quiet)
    started = time.monotonic()
    data = sample_data() if data is None else sample_folder(data)
    settings = Settings()  # a fresh home's defaults: the demo shows what people install
    check_bind(settings.serve.host, port or settings.serve.port, settings)  # fail in a second, not after training
    fresh_home(root)
    with ProgressDisplay(console, enabled=not quiet) as show:
        home = init(root, "embedded", show, settings=settings)
        shutil.copy(data / "policies.jsonl", home.inbox / "clinic-policies.jsonl")
        shutil.copy(data / "probes.jsonl", home.probes / "clinic-probes.jsonl")
        engine = LocalEngine(root)
        engine.ingest(show)
        run_id = engine.train(emit=show)
        version = engine.export(run_id, emit=show).version
        engine.promote(version)
    trained_at = time.monotonic()
    settings = engine.settings
    server = Server(home, settings, port=port).start()
    try:
        results = compare(home, server.url, version)
        summary = _report(console, results, version, root, server.url, trained_at - started, time.monotonic() - started)
        if wait:
            console.print("The endpoint keeps running; press Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        server.stop()
    return summary


def compare(home: Home, url: str, version: str) -> list[dict[str, Any]]:
    questions = probes.load(home.probes / "clinic-probes.jsonl")
    out = []
    with probes.endpoint_client(url, read_api_key(home)) as client:
        for probe in questions:
            before = probes.ask(client, "base", probe.question)
            after = probes.ask(client, version, probe.question)
            out.append(
                {
                    "question": probe.question,
                    "expected": probe.expected,
                    "base": before,
                    "tuned": after,
                    "base_hit": probe.hit(before),
                    "tuned_hit": probe.hit(after),
                }
            )
    return out


def _report(
    console: Console,
    results: list[dict[str, Any]],
    version: str,
    root: Path,
    url: str,
    pipeline_s: float,
    total_s: float,
) -> dict[str, Any]:
    table = Table(title="Probe questions (not in the training data word for word)", show_lines=True)
    table.add_column("question", ratio=3)
    table.add_column("expected", ratio=1)
    table.add_column("base", ratio=3)
    table.add_column(version, ratio=3)
    for r in results:
        mark = lambda hit: "[green]✓[/] " if hit else "[red]✗[/] "  # noqa: E731
        table.add_row(
            r["question"],
            ", ".join(r["expected"]),
            mark(r["base_hit"]) + _clip(r["base"]),
            mark(r["tuned_hit"]) + _clip(r["tuned"]),
        )
    console.print(table)
    base_score = sum(r["base_hit"] for r in results)
    tuned_score = sum(r["tuned_hit"] for r in results)
    console.print(
        f"[bold]Expected phrase found:[/] base {base_score}/{len(results)}, {version} {tuned_score}/{len(results)}"
    )
    console.print(f"Pipeline time {pipeline_s / 60:.1f} min; total {total_s / 60:.1f} min.")
    key_file = Home(root).api_key
    console.print(
        "Try it:\n"
        f'  curl -s {url}/v1/chat/completions -H "Authorization: Bearer $(cat {key_file})" '
        "-H 'Content-Type: application/json' "
        '-d \'{"model": "appliance", "messages": [{"role": "user", '
        '"content": "What is the extension for the on-call pharmacist?"}]}\'',
        soft_wrap=True,
    )
    return {
        "version": version,
        "base_score": base_score,
        "tuned_score": tuned_score,
        "probes": len(results),
        "pipeline_seconds": pipeline_s,
        "total_seconds": total_s,
        "endpoint": url,
        "current": registry.current(Home(root)),
        "results": results,
    }


def _clip(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
