"""PDF documents, through pypdf: the text layer of every page, in order.

Scanned pages have no text layer (OCR is out of scope) and a password-protected
PDF cannot be read; both are rejected with that said plainly. pypdf raises many
kinds of exception on damaged files, so any failure to read is one reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

from appliance.data.ingest.parsed import FileError, Parsed, first_line
from appliance.data.ingest.text import document_text
from appliance.home.config import DataSection

SUFFIXES = (".pdf",)
FORMAT = "pdf"


def parse(path: Path, data: DataSection | None = None) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    logging.getLogger("pypdf").setLevel(logging.ERROR)  # damaged files: our one-line reason says enough
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise FileError("the PDF is protected by a password; save an unprotected copy")
        pages = [page.extract_text() or "" for page in reader.pages]
    except FileError:
        raise
    except (FileNotDecryptedError, DependencyError):
        raise FileError("the PDF is encrypted in a way that cannot be read here; save an unprotected copy") from None
    except Exception as exc:  # noqa: BLE001  (pypdf on damaged input: anything can surface)
        raise FileError(f"not a readable PDF ({first_line(exc)})") from None
    try:
        return Parsed(format=FORMAT, text=document_text("\n\n".join(pages), "the PDF"))
    except FileError:
        raise FileError(
            "the PDF has no text layer (scanned pages would need OCR, which the appliance does not do)"
        ) from None
