"""Word ``.docx`` documents, through python-docx: paragraphs and table rows in order.

A password-protected Word file is not a .docx (zip) at all but an OLE container,
as is an old ``.doc`` renamed; both are recognised by their first bytes and
rejected with that said plainly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.data.ingest.parsed import FileError, Parsed, first_line
from appliance.data.ingest.text import document_text
from appliance.home.config import DataSection

SUFFIXES = (".docx",)
FORMAT = "docx"
OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"


def parse(path: Path, data: DataSection | None = None) -> Parsed:
    with open(path, "rb") as handle:
        head = handle.read(len(OLE_MAGIC))
    if head == OLE_MAGIC:
        raise FileError(
            "the document is password-protected or an old .doc file renamed (an OLE container, "
            "not .docx); save an unprotected .docx copy"
        )
    try:
        import docx

        document = docx.Document(str(path))
        text = "\n\n".join(_blocks(document))
    except Exception as exc:  # noqa: BLE001  (damaged zip or XML: anything can surface)
        raise FileError(f"not a readable Word .docx document ({first_line(exc)})") from None
    return Parsed(format=FORMAT, text=document_text(text, "the document"))


def _blocks(document: Any) -> Iterator[str]:
    """Paragraph texts, and each table row as its cells joined by ' | '."""
    for block in document.iter_inner_content():
        if hasattr(block, "rows"):
            for row in block.rows:
                yield " | ".join(cell.text.strip() for cell in row.cells)
        else:
            yield block.text
