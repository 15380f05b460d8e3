"""Models: the versions, how they differ, promote and roll back (with a confirmation) — for the
collection chosen at the top (issue 11; g picks the next one)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, OptionList, Static
from textual.widgets.option_list import Option

from appliance.contract.api import ModelVersion
from appliance.contract.names import model_id
from tui.board import Board, training_method
from tui.screens.base import CollectionScreen
from tui.screens.dashboard import gate_summary
from tui.widgets import CollectionBar, ConfirmScreen, MarkdownScreen, NavBar


def difference(
    version: ModelVersion, previous: ModelVersion | None, mine: dict[str, Any], theirs: dict[str, Any]
) -> str:
    if previous is None:
        return "first version"
    parts = []
    loss, before = mine.get("val_loss"), theirs.get("val_loss")
    if isinstance(loss, (int, float)) and isinstance(before, (int, float)):
        parts.append(f"loss {loss - before:+.3f}")
    docs, docs_before = mine.get("documents"), theirs.get("documents")
    if isinstance(docs, int) and isinstance(docs_before, int) and docs != docs_before:
        parts.append(f"{docs - docs_before:+d} docs")
    parts.append(f"{(version.size - previous.size) / 1e6:+.0f} MB")
    if version.quant != previous.quant:
        parts.append(f"{previous.quant}→{version.quant}")
    return ", ".join(parts)


def answer_words(details: dict[str, Any]) -> str:
    """' Answers vs reference: EM 0.30, F1 0.52, ROUGE-L 0.48, BLEU 21.0 (model it replaced: …).'
    from the gate's metrics on sampled validation questions; nothing when not recorded."""
    metrics = details.get("answers") or {}

    def line(m: Any) -> str:
        if not isinstance(m, dict) or "exact_match" not in m:
            return ""
        return f"EM {m['exact_match']:.2f}, F1 {m['token_f1']:.2f}, ROUGE-L {m['rouge_l']:.2f}, BLEU {m['bleu']:.1f}"

    ours, theirs = line(metrics.get("candidate")), line(metrics.get("current"))
    if not ours:
        return ""
    return f" Answers vs reference: {ours}" + (f" (model it replaced: {theirs})." if theirs else ".")


def method_words(details: dict[str, Any]) -> str:
    """' Trained with qlora: <why>.' when the training run recorded its method; nothing otherwise."""
    method = details.get("method")
    if not method:
        return ""
    reason = details.get("method_reason")
    return f" Trained with {method}" + (f": {reason}." if reason else ".")


def number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


class ModelsScreen(CollectionScreen):
    AUTO_FOCUS = "DataTable"  # not the collection list: letters are this screen's keys
    DEFAULT_CSS = """
    ModelsScreen DataTable { height: 1fr; }
    ModelsScreen #detail { height: auto; max-height: 8; padding: 0 1; border-top: solid $primary; }
    """
    BINDINGS = [
        Binding("p", "promote", "Promote"),
        Binding("r", "rollback", "Roll back"),
        Binding("e", "method", "Method"),
        Binding("l", "lineage", "Lineage"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.versions: list[ModelVersion] = []
        self.details: dict[str, dict[str, Any]] = {}  # version -> val_loss, probes, documents (when known)
        self._shown_collection = ""  # the collection the table holds

    def compose(self) -> ComposeResult:
        yield Header()
        yield NavBar("models")
        yield CollectionBar()
        with Vertical():
            table: DataTable = DataTable(cursor_type="row", zebra_stripes=True, id="versions")
            table.add_columns("version", "built", "quant", "size", "val loss", "probes", "method", "vs previous")
            yield table
            yield Static("Select a version: p promotes it, r rolls back, l shows which documents made it.", id="detail")
        yield Footer()

    def show_board(self, board: Board) -> None:
        self.show_collections(board)
        if self.collection:  # the board holds the window's own collection; a chosen one is read for it
            self.read("reading the collection's versions", lambda client: client.models(), self.show_models)
        else:
            self.show_models(board.models)

    def show_models(self, models: list[ModelVersion]) -> None:
        if self._shown_collection == self.collection and [(v.version, v.current) for v in models] == [
            (v.version, v.current) for v in self.versions
        ]:
            return
        if self._shown_collection != self.collection:  # the same names in another collection are other versions
            self._shown_collection = self.collection
            self.details, self.versions = {}, []
        self.fill(models)
        models = list(models)

        def show(details: dict[str, Any]) -> None:
            self.details.update(details)
            self.fill(models)

        self.read(
            "reading the versions' numbers", lambda client: {v.version: client.version_details(v) for v in models}, show
        )

    def where(self) -> str:
        """' in cardiology' when a collection other than the shared one is shown."""
        return f" in {self.collection}" if self.collection else ""

    def model_id(self) -> str:
        """What requests name to reach the chosen collection's served version."""
        row = self.collection_row()
        return row["model_id"] if row else model_id(self.collection)

    def fill(self, models: list[ModelVersion]) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        previous = None
        for v in models:
            d = self.details.get(v.version, {})
            name = f"{v.version} ●" if v.current else v.version
            table.add_row(
                name,
                datetime.fromtimestamp(v.created).strftime("%m-%d %H:%M"),
                v.quant,
                f"{v.size / 1e6:.0f} MB",
                number(d.get("val_loss")),
                d.get("probes") or "-",
                d.get("method") or "-",
                difference(v, previous, d, self.details.get(previous.version, {}) if previous else {}),
                key=v.version,
            )
            previous = v
        self.versions = list(models)  # only once the table shows them
        if not self.versions and self.collection:
            self.query_one("#detail", Static).update(
                f"No versions in this collection yet: the first appears when a training run on its documents "
                f"passes the gate. Until then '{self.model_id()}' is not served."
            )
        elif not self.versions:
            self.query_one("#detail", Static).update(
                "No model versions yet: the first one appears after 'appliance init' exports the base model."
            )
        elif row < len(self.versions):
            table.move_cursor(row=row)

    def selected(self) -> ModelVersion | None:
        table = self.query_one(DataTable)
        if not self.versions or table.cursor_row >= len(self.versions):
            return None
        return self.versions[table.cursor_row]

    def current(self) -> ModelVersion | None:
        return next((v for v in self.versions if v.current), None)

    def action_method(self) -> None:
        def chosen(method: str | None) -> None:
            if method:
                self.appliance.act(
                    f"choosing {method}",
                    lambda: self.appliance.client.set_method(method),
                    lambda now: self.appliance.notify(f"The next training run uses {now}.", title="Training method"),
                )

        self.app.push_screen(MethodScreen(), chosen)

    def action_promote(self) -> None:
        chosen, current = self.selected(), self.current()
        if chosen is None:
            self.notify("There is no version to promote yet.", severity="warning")
            return
        if chosen.current:
            self.notify(f"{chosen.version} is already the one being served.")
            return
        was = f"instead of {current.version}" if current else "(nothing is served now)"
        consequence = (
            f"The endpoint will answer requests for '{self.model_id()}' with {chosen.version} {was}. "
            f"Requests in progress finish on the old model."
            + (f" You can roll back to {current.version} afterwards." if current else "")
        )

        collection, top = self.collection, self.appliance.client

        def done(yes: bool | None) -> None:
            if yes:  # the collection asked about, even if the person switched since
                self.appliance.act(
                    f"promoting {chosen.version}",
                    lambda: top.scoped(collection).promote(chosen.version),
                    lambda _: self.appliance.notify(f"Now serving {chosen.version}.", title="Promoted"),
                )

        self.app.push_screen(ConfirmScreen(f"Promote {chosen.version}{self.where()}?", consequence, "Promote"), done)

    def action_rollback(self) -> None:
        current = self.current()
        if current is None:
            self.notify("Nothing is being served, so there is nothing to roll back.", severity="warning")
            return
        consequence = (
            f"The endpoint stops serving {current.version} and serves the version promoted "
            f"before it again. {current.version} stays on disk and can be promoted again later."
        )

        collection, top = self.collection, self.appliance.client

        def done(yes: bool | None) -> None:
            if yes:
                self.appliance.act(
                    "rolling back",
                    lambda: top.scoped(collection).rollback(),
                    lambda v: self.appliance.notify(f"Rolled back: now serving {v}.", title="Rolled back"),
                )

        self.app.push_screen(
            ConfirmScreen(f"Roll back{self.where()} from {current.version}?", consequence, "Roll back"), done
        )

    def action_lineage(self) -> None:
        chosen = self.selected()
        if chosen is None:
            return
        detail = self.query_one("#detail", Static)

        def show(lineage: dict[str, Any] | None) -> None:
            if lineage is None:  # a version promoted by command, not by the daemon's pipeline, has none
                detail.update(
                    f"{chosen.version}: run {chosen.run or '-'}, snapshot {chosen.snapshot or '-'}, "
                    f"sha256 {chosen.sha256[:16]}… No lineage recorded (which documents): only versions "
                    f"the daemon promotes have one."
                )
            else:
                self.app.push_screen(LineageScreen(lineage_markdown(chosen.version, lineage)))

        self.read("reading the lineage", lambda client: client.lineage(chosen.version), show)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        v = self.selected()
        if v is not None:
            self.query_one("#detail", Static).update(
                f"{v.version}{' (served now)' if v.current else ''}: run {v.run or '-'}, snapshot "
                f"{v.snapshot or '-'}, sha256 {v.sha256[:16]}…{method_words(self.details.get(v.version, {}))}"
                f"{answer_words(self.details.get(v.version, {}))}"
                f"  p promote · r roll back · l lineage"
            )


def lineage_markdown(version: str, lineage: dict[str, Any]) -> str:
    """What made a version, from its lineage.json, for people: documents first."""

    def short(value: Any) -> str:
        return f"`{str(value)[:16]}…`" if value else "-"

    def when(at: Any) -> str:
        return datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M") if isinstance(at, (int, float)) else "-"

    docs = lineage.get("documents") or []
    training = lineage.get("training") or {}
    method = dict(zip(("method", "method_reason"), training_method({}, lineage)))
    lines = [
        f"# {version}: what made it",
        "",
        f"- **Base model** {lineage.get('base', '-')} {short(lineage.get('base_sha256'))}",
        f"- **Data** snapshot {lineage.get('snapshot') or '-'}: {lineage.get('records', '?')} records "
        f"from {len(docs)} document(s)",
        f"- **Training** run {lineage.get('run') or '-'}, {training.get('steps', '?')} steps, best validation "
        f"loss {number(training.get('best_val_loss'))}.{method_words(method)}",
        f"- **File** {lineage.get('quant') or '-'} {short(lineage.get('gguf_sha256'))}",
        f"- **Promoted** {when(lineage.get('promoted_at'))} by job {lineage.get('job', '-')} "
        f"({lineage.get('kind', '-')})",
        "",
        f"## Documents ({len(docs)})",
        "",
        "| document | records | sha256 |",
        "|---|---|---|",
    ]
    for d in docs:
        if isinstance(d, dict):
            lines.append(f"| {d.get('path') or '-'} | {d.get('records', '-')} | {short(d.get('sha256'))} |")
    gate = lineage.get("gate")
    if isinstance(gate, dict):
        lines += ["", "## Gate", "", gate_summary(gate)]
        lines += facts_known(gate.get("recall") or {})
        lines += sample_answers((gate.get("metrics") or {}).get("sample") or [])
    return "\n".join(lines)


def facts_known(recall: dict[str, Any]) -> list[str]:
    """'knows 27 of 30 facts from handbook.pdf': facts with a held-out question answered, per document."""
    docs = [d for d in (recall.get("documents") or {}).values() if isinstance(d, dict) and d.get("facts_asked")]
    if not docs:
        return []
    lines = ["", "## Facts (closed-book, on questions it never trained on)", ""]
    for d in docs:
        known = (d.get("facts_known") or {}).get("candidate", 0)
        lines.append(
            f"- knows {known} of {d['facts_asked']} facts asked from {d.get('path') or '-'} "
            f"({d.get('facts', '?')} found in it)"
        )
    return lines


def sample_answers(sample: list[Any]) -> list[str]:
    """The gate's sampled validation questions with both models' answers, as a table."""

    def cell(text: Any) -> str:
        return " ".join(str(text or "-").split()).replace("|", "/")[:120]

    rows = [item for item in sample if isinstance(item, dict)]
    if not rows:
        return []
    lines = [
        "",
        f"## Sample answers ({len(rows)} validation questions)",
        "",
        "| question | expected | this version | the model it replaced |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {cell(r.get('question'))} | {cell(r.get('reference'))} | {cell(r.get('candidate'))} | "
        f"{cell(r.get('current'))} |"
        for r in rows
    ]
    return lines


class LineageScreen(MarkdownScreen):
    DEFAULT_CSS = "LineageScreen > VerticalScroll { width: 78; }"
    BINDINGS = [Binding("escape,q,l", "dismiss", "Close")]
    FOOTER = True

    def __init__(self, text: str):
        super().__init__(text, markdown_id="lineage")


# What each method means, for the person choosing (appliance/training/methods.py has the rules).
METHODS = [
    ("auto", "Let the appliance choose by data size and free memory (it says which and why)"),
    ("qlora", "LoRA on a 4-bit copy of the base: least memory (the default)"),
    ("lora", "LoRA on the full-precision base: a little more memory, a little faster"),
    ("dora", "Weight-decomposed LoRA: sometimes better quality, slower"),
    ("adalora", "LoRA that moves its rank to the layers that need it"),
    ("ia3", "Learned scaling of a few layers: very few parameters, for small data"),
    ("full", "Every weight: only for small bases, with plenty of data and memory"),
]


class MethodScreen(ModalScreen[str | None]):
    """Pick how the next runs train; the engine checks it like config.toml."""

    DEFAULT_CSS = """
    MethodScreen { align: center middle; }
    MethodScreen > Vertical { width: 76; max-width: 100%; height: auto; border: thick $accent;
                              background: $surface; padding: 0 1; }
    MethodScreen OptionList { height: auto; max-height: 12; }
    """
    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static("How should the next training runs learn? (enter to choose, escape to cancel)")
            yield OptionList(*[Option(f"{name:<8} {words}", id=name) for name, words in METHODS])
        yield Footer()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
