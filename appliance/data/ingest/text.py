"""Plain text and Markdown documents: continued-pretraining text, chunked later by tokens."""

from __future__ import annotations

from pathlib import Path

from appliance.data.ingest.parsed import FileError, Parsed
from appliance.home.config import DataSection

SUFFIXES = (".txt", ".md", ".markdown")


def parse(path: Path, data: DataSection | None = None) -> Parsed:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileError(
            f"the file is not valid UTF-8 text (first bad byte at offset {exc.start}); save it as UTF-8"
        ) from None
    fmt = "text" if path.suffix.lower() == ".txt" else "markdown"
    return Parsed(format=fmt, text=document_text(text, "the document"))


def document_text(text: str, what: str) -> str:
    """Normalised line ends and no trailing blanks; FileError when nothing is left."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    cleaned = "\n".join(line.rstrip() for line in lines).strip()
    if not cleaned:
        raise FileError(f"{what} holds no text")
    return cleaned
