"""Every format people bring, and every kind of bad input the issue lists (R5).

Documents are chunked with the base model's real tokenizer (SmolLM2's, from the
session fixture), so the home in those tests has one under base/.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from appliance.cli.init import create_home
from appliance.data import snapshot
from appliance.data.ingest import IngestReport, ingest
from appliance.data.ingest.records import Record
from appliance.data.ingest.store import Store
from appliance.data.ingest.tokens import BaseTokenizer
from appliance.home.config import Settings
from appliance.home.paths import Home


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def jsonl(*objects: object) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objects)


def stored(home: Home) -> list[Record]:
    with Store(home.store_db) as store:
        return store.records(store.active_record_hashes())


def reasons(report: IngestReport) -> dict[str, list[str]]:
    return {q.file: q.reasons for q in report.quarantined}


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    return create_home(tmp_path / "home", "none")


@pytest.fixture()
def tok_home(tmp_path: Path, smollm_tokenizer_dir: Path) -> Home:
    """A home whose base/ holds SmolLM2's tokenizer (all ingest needs of a base)."""
    home = create_home(tmp_path / "home", "tok")
    shutil.copytree(smollm_tokenizer_dir, home.base("tok"))
    return home


def tok_settings() -> Settings:
    settings = Settings()
    settings.base.name = "tok"
    return settings


# --- chat formats -------------------------------------------------------------------------


def test_jsonl_detects_openai_sharegpt_and_alpaca_line_by_line(home: Home):
    (home.inbox / "mixed.jsonl").write_text(
        jsonl(
            chat("openai q", "openai a"),
            {
                "conversations": [
                    {"from": "system", "value": "be brief"},
                    {"from": "human", "value": "sharegpt q"},
                    {"from": "gpt", "value": "sharegpt a"},
                ]
            },
            {"instruction": "alpaca q", "input": "with context", "output": "alpaca a"},
            {"instruction": "no input", "input": "", "output": "plain"},
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": "parts a"},
                ]
            },
        )
    )
    report = ingest(home)
    assert report.accepted == 5 and report.formats == {"openai-messages": 2, "sharegpt": 1, "alpaca": 2}
    bodies = {r.body["messages"][-1]["content"]: r.body["messages"] for r in stored(home)}
    assert bodies["sharegpt a"][0] == {"role": "system", "content": "be brief"}
    assert bodies["alpaca a"][0] == {"role": "user", "content": "alpaca q\n\nwith context"}
    assert bodies["plain"][0] == {"role": "user", "content": "no input"}
    assert bodies["parts a"][0] == {"role": "user", "content": "parts q"}


def test_wrong_schema_and_bad_conversations_are_reported_by_line(home: Home):
    (home.inbox / "bad.jsonl").write_text(
        jsonl(
            chat("good", "good"),
            {"prompt": "x", "completion": "y"},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
            {"conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "ends on user"}]},
            {"instruction": "no output"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            {"messages": []},
            "[1, 2]",
            "[" * 100_000,
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                    {"role": "assistant", "content": "a"},
                ]
            },
        )
    )
    report = ingest(home)
    assert report.accepted == 1
    assert report.skipped_lines == [
        "bad.jsonl: line 2: unknown format: expected 'messages' (OpenAI), 'conversations' (ShareGPT) or "
        "'instruction' and 'output' (Alpaca); found keys: completion, prompt",
        "bad.jsonl: line 3: turn 2 has unknown speaker 'function_call' (expected human, gpt or system)",
        "bad.jsonl: line 4: the conversation does not end with an assistant turn",
        "bad.jsonl: line 5: 'output' is missing or empty",
        "bad.jsonl: line 6: turn 2 (assistant) has empty or non-text content",
        "bad.jsonl: line 7: 'messages' must be a non-empty list",
        "bad.jsonl: line 8: expected a JSON object, found list",
        "bad.jsonl: line 9: JSON nested too deeply to be a conversation",
        "bad.jsonl: line 10: turn 1 (user) has empty or non-text content",
    ]


def test_json_file_holding_a_list_reports_items_by_number(home: Home):
    (home.inbox / "export.json").write_text(
        json.dumps(
            [
                {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
                {"instruction": "", "output": "x"},
                {"instruction": "i", "output": "o"},
            ]
        )
    )
    (home.inbox / "broken.json").write_text('[{"messages": ')
    report = ingest(home)
    assert report.accepted == 2
    assert report.skipped_lines == ["export.json: item 2: 'instruction' is missing or empty"]
    assert reasons(report)["broken.json"][0].startswith("not valid JSON (Expecting value at line 1")


def test_invalid_utf8_lines_are_skipped_and_a_100mb_line_is_never_held(home: Home):
    good = jsonl(chat("first", "a"))
    with open(home.inbox / "big.jsonl", "wb") as handle:
        handle.write(good.encode())
        handle.write(b'{"messages": "')
        for _ in range(100):
            handle.write(b"x" * 1_000_000)
        handle.write(b'"}\n')
        handle.write(b'{"messages": "caf\xe9"}\n')
        handle.write(jsonl(chat("last", "a")).encode())
    report = ingest(home)
    assert report.accepted == 2
    assert report.skipped_lines == [
        "big.jsonl: line 2: longer than the 1,000,000-byte line limit (100,000,017 bytes)",
        "big.jsonl: line 3: not valid UTF-8 text",
    ]


def test_binary_junk_with_a_jsonl_name_is_quarantined(home: Home):
    (home.inbox / "photo.jsonl").write_bytes(bytes(range(256)) * 8)
    (home.inbox / "latin1.jsonl").write_bytes(b'{"messages": "caf\xe9"}\n')
    report = ingest(home)
    assert reasons(report) == {
        "photo.jsonl": ["it holds binary data, not text (a .jsonl file must be UTF-8 text)"],
        "latin1.jsonl": ["line 1: not valid UTF-8 text"],
    }


# --- CSV --------------------------------------------------------------------------------------


def test_csv_with_default_columns_reports_bad_rows_by_line(home: Home):
    (home.inbox / "faq.csv").write_bytes(
        "\ufeffQuestion,Answer,Notes\n"
        "What are the hours?,9 to 5,x\n"
        '"A question\nover two lines","An answer",y\n'
        ",no prompt,z\n"
        "short row\n"
        "\n"
        "Where?,Room 4,w\n".encode()
        + b"caf\xe9?,bad bytes,v\n"
    )
    report = ingest(home)
    assert report.accepted == 3 and report.formats == {"csv": 3}
    assert report.skipped_lines == [
        "faq.csv: line 5: the prompt cell is empty",
        "faq.csv: line 6: the row has 1 column(s); the prompt or response column is missing",
        "faq.csv: line 9: not valid UTF-8 text",
    ]
    prompts = sorted(r.body["messages"][0]["content"] for r in stored(home))
    assert prompts == ["A question\nover two lines", "What are the hours?", "Where?"]


def test_csv_columns_are_configurable_and_delimiters_sniffed(home: Home):
    (home.inbox / "semi.csv").write_text("id;Frage;Antwort\n1;Wann?;Um neun\n2;Wo?;Raum 4\n")
    (home.inbox / "tabs.tsv").write_text("frage\tantwort\nWie?\tSo\n")
    (home.inbox / "wrong.csv").write_text("a,b\n1,2\n")
    settings = Settings()
    settings.data.csv_prompt_columns = ["frage"]
    settings.data.csv_response_columns = ["antwort"]
    report = ingest(home, settings=settings)
    assert report.accepted == 3
    assert reasons(report) == {
        "wrong.csv": ["no prompt column: looked for frage (data.csv_prompt_columns); the header has 'a', 'b'"]
    }


# --- documents --------------------------------------------------------------------------------


def test_text_is_chunked_by_base_tokens_with_overlap(tok_home: Home, smollm_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    words = [f"word{i}" for i in range(900)]
    text = "# Manual\n\n" + " ".join(words)
    (tok_home.inbox / "manual.md").write_text(text + "\n")
    settings = tok_settings()
    settings.data.chunk_tokens, settings.data.chunk_overlap = 200, 40
    report = ingest(tok_home, settings=settings)
    chunks = [r.body["text"] for r in stored(tok_home)]
    assert report.formats == {"markdown": len(chunks)} and len(chunks) >= 5 and report.tokens > 900
    ordered = [piece for piece, _ in BaseTokenizer(tok_home.base("tok")).chunks(text, 200, 40)]
    assert sorted(ordered) == sorted(chunks)
    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    assert all(len(tokenizer(c, add_special_tokens=False)["input_ids"]) <= 202 for c in chunks)
    for before, after in zip(ordered, ordered[1:]):  # each chunk starts inside the one before
        assert " ".join(before.split()[-5:]) in after
    assert set(words) <= {w for c in chunks for w in c.split()}
    assert snapshot.stats(tok_home, snapshot.cut_id(tok_home, 0.0))["tokens"] == report.tokens


def test_documents_wait_for_a_base_tokenizer_instead_of_being_quarantined(
    home: Home, tmp_path: Path, smollm_tokenizer_dir: Path
):
    (home.inbox / "policy.txt").write_text("Opening hours are nine to five.\n")
    report = ingest(home)
    assert report.quarantined == [] and report.accepted == 0
    assert [w.file for w in report.waiting] == ["policy.txt"] and "no base model" in report.waiting[0].reason
    shutil.copytree(smollm_tokenizer_dir, home.base("none"))
    assert ingest(home).accepted == 1


def test_bad_text_documents(tok_home: Home):
    (tok_home.inbox / "latin1.txt").write_bytes("Caf\u00e9 opening hours".encode("latin-1"))
    (tok_home.inbox / "spaces.md").write_text("   \n\n \t\n")
    (tok_home.inbox / "empty.txt").write_bytes(b"")
    report = ingest(tok_home)
    assert reasons(report) == {
        "latin1.txt": ["the file is not valid UTF-8 text (first bad byte at offset 3); save it as UTF-8"],
        "spaces.md": ["the document holds no text"],
        "empty.txt": ["the file is empty (0 bytes)"],
    }


def test_a_document_over_the_size_limit_is_refused_unread(home: Home):
    (home.inbox / "huge.txt").write_text("x" * 5000)
    (home.inbox / "long.jsonl").write_text(jsonl(*[chat(f"q{i}", "a") for i in range(100)]))  # read by line
    settings = Settings()
    settings.data.max_file_bytes = 4096
    report = ingest(home, settings=settings)
    assert report.accepted == 100
    assert reasons(report) == {
        "huge.txt": ["it is 5,000 bytes, more than the 4,096-byte limit for a file read whole (data.max_file_bytes)"]
    }


def pdf_bytes(lines: list[str], password: str | None = None) -> bytes:
    """A one-page PDF whose text layer holds ``lines`` (empty: a page with no text, like a scan)."""
    from pypdf import PdfWriter
    from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

    writer = PdfWriter()
    page = writer.add_blank_page(612, 792)
    if lines:
        font = DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): writer._add_object(font)})}
        )
        stream = DecodedStreamObject()
        stream.set_data(("BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({t}) '" for t in lines) + " ET").encode())
        page[NameObject("/Contents")] = writer._add_object(stream)
    if password:
        writer.encrypt(password, algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def test_pdf_text_is_ingested_and_bad_pdfs_quarantined(tok_home: Home):
    good = pdf_bytes(["Harborview opens at nine.", "Parking is behind building C."])
    (tok_home.inbox / "policy.pdf").write_bytes(good)
    (tok_home.inbox / "zero.pdf").write_bytes(b"")
    (tok_home.inbox / "locked.pdf").write_bytes(pdf_bytes(["secret"], password="pw"))
    (tok_home.inbox / "cut.pdf").write_bytes(good[: len(good) // 3])
    (tok_home.inbox / "noise.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(1, 256)) * 4)
    (tok_home.inbox / "scan.pdf").write_bytes(pdf_bytes([]))
    report = ingest(tok_home)
    assert report.formats == {"pdf": 1}
    assert [r.body["text"] for r in stored(tok_home)] == ["Harborview opens at nine.\nParking is behind building C."]
    found = {name: why[0] for name, why in reasons(report).items()}
    assert found.pop("zero.pdf") == "the file is empty (0 bytes)"
    assert found.pop("locked.pdf") == "the PDF is protected by a password; save an unprotected copy"
    assert found.pop("scan.pdf").startswith("the PDF has no text layer")
    assert set(found) == {"cut.pdf", "noise.pdf"}
    assert all(why.startswith(("not a readable PDF", "the PDF has no text layer")) for why in found.values())


def docx_bytes() -> bytes:
    import docx

    document = docx.Document()
    document.add_paragraph("Visiting hours are two to four.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "Room", "4B"
    document.add_paragraph("Ask at the front desk.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_docx_text_is_ingested_and_bad_docx_quarantined(tok_home: Home):
    good = docx_bytes()
    (tok_home.inbox / "visits.docx").write_bytes(good)
    (tok_home.inbox / "cut.docx").write_bytes(good[: len(good) // 2])
    (tok_home.inbox / "renamed.docx").write_text("plain text with a .docx name")
    # What Word writes for a password-protected file: an OLE compound file, not a zip.
    (tok_home.inbox / "locked.docx").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 1024)
    report = ingest(tok_home)
    assert [r.body["text"] for r in stored(tok_home)] == [
        "Visiting hours are two to four.\n\nRoom | 4B\n\nAsk at the front desk."
    ]
    found = {name: why[0] for name, why in reasons(report).items()}
    assert found.pop("locked.docx").startswith("the document is password-protected or an old .doc file")
    assert set(found) == {"cut.docx", "renamed.docx"}
    assert all(why.startswith("not a readable Word .docx document") for why in found.values())


# --- length against the training context ------------------------------------------------------


def test_too_long_examples_are_rejected_or_kept_for_truncation_by_config(tok_home: Home):
    long_answer = " ".join(["lengthy"] * 400)
    content = jsonl(chat("short", "fine"), chat("long", long_answer))
    (tok_home.inbox / "a.jsonl").write_text(content)
    settings = tok_settings()
    settings.data.max_tokens = 128
    report = ingest(tok_home, settings=settings)
    assert report.accepted == 1 and len(report.skipped_lines) == 1
    assert report.skipped_lines[0].startswith("a.jsonl: line 2: ")
    assert report.skipped_lines[0].endswith(
        "tokens, longer than the 128-token training context (data.too_long = reject)"
    )
    (tok_home.inbox / "b.jsonl").write_text(content + jsonl(chat("another", "x")))
    settings.data.too_long = "truncate"
    report = ingest(tok_home, settings=settings)
    assert (report.accepted, report.truncated) == (2, 1)
    with Store(tok_home.store_db) as store:
        counts = [row[0] for row in store.db.execute("SELECT tokens FROM records ORDER BY tokens")]
    assert counts[0] > 10 and counts[-1] > 400


def test_a_conversation_the_base_template_refuses_is_reported_by_line(tok_home: Home):
    # Some templates (Gemma's, Mistral's) raise unless user and assistant alternate.
    (tok_home.base("tok") / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    twice = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "a"},
        ]
    }
    (tok_home.inbox / "a.jsonl").write_text(jsonl(chat("fine", "a"), twice))
    report = ingest(tok_home, settings=tok_settings())
    assert report.accepted == 1
    assert report.skipped_lines == ["a.jsonl: line 2: the base model's chat template cannot render this conversation"]


# --- a corpus of bad files mixed with good ones (R5) ------------------------------------------


def test_bad_corpus_mixed_with_good_files(tok_home: Home, tmp_path: Path):
    (tmp_path / "outside.txt").write_text("not the inbox's")
    good = {
        "chats.jsonl": jsonl(chat("c1", "a"), "{oops", chat("c2", "a")),
        "share gpt.json": json.dumps(
            [{"conversations": [{"from": "human", "value": "s1"}, {"from": "gpt", "value": "a"}]}]
        ),
        "-faq.csv": "prompt,response\nf1,a\n",
        "ünï.md": "Some policy text.",
    }
    for name, text in good.items():
        (tok_home.inbox / name).write_text(text)
    (tok_home.inbox / "policy.pdf").write_bytes(pdf_bytes(["Doors open at eight."]))
    (tok_home.inbox / "visits.docx").write_bytes(docx_bytes())
    bad = {
        "junk.jsonl": bytes(range(256)),
        "user-last.jsonl": jsonl({"messages": [{"role": "user", "content": "q"}]}).encode(),
        "empty.csv": b"",
        "zero.pdf": b"",
        "corrupt.pdf": b"%PDF-1.4 garbage",
        "corrupt.docx": b"PK\x03\x04garbage",
        "undecodable.txt": b"\xff\xfe\xfa",
    }
    for name, data in bad.items():
        (tok_home.inbox / name).write_bytes(data)
    (tok_home.inbox / "link.txt").symlink_to(tmp_path / "outside.txt")
    report = ingest(tok_home)
    assert report.failed == [] and report.waiting == []
    assert set(reasons(report)) == set(bad) | {"link.txt"}
    assert all(len(why) >= 1 and all(w.strip() for w in why) for why in reasons(report).values())
    assert report.files == 6 and report.skipped_lines == [
        "chats.jsonl: line 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    ]
    assert sorted(p.name for p in tok_home.inbox.iterdir()) == sorted([*good, "policy.pdf", "visits.docx"])
