"""Regenerate handbook.docx and handbook.pdf from handbook.md (only needed after editing the text).

The committed .docx and .pdf are what the tests read; this script is the record of how
they were made. It needs python-docx and fpdf2 (``pip install fpdf2``), a pure-Python
PDF writer whose core Helvetica font gives the PDF a real text layer that pypdf extracts.
Run: ``python examples/handbook/make_files.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXED_DATE = datetime(2026, 1, 1, tzinfo=UTC)


def blocks(markdown: str) -> list[tuple[int, str]]:
    """(heading level, text) per block: 1 for '#', 2 for '##', 0 for a paragraph."""
    out = []
    for block in markdown.strip().split("\n\n"):
        block = " ".join(block.split())
        level = len(block) - len(block.lstrip("#"))
        out.append((level, block.lstrip("#").strip()))
    return out


def write_docx(parts: list[tuple[int, str]], path: Path) -> None:
    import docx

    document = docx.Document()
    for level, text in parts:
        if level:
            document.add_heading(text, level=level - 1 if level > 1 else 0)
        else:
            document.add_paragraph(text)
    document.core_properties.title = parts[0][1]
    document.core_properties.created = document.core_properties.modified = FIXED_DATE
    document.save(str(path))


def write_pdf(parts: list[tuple[int, str]], path: Path) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_title(parts[0][1])
    pdf.set_creation_date(FIXED_DATE)  # stable output: regenerating unchanged text changes little
    pdf.set_margins(22, 20, 22)
    pdf.add_page()
    for level, text in parts:
        size = {1: 17, 2: 13}.get(level, 11)
        pdf.set_font("Helvetica", "B" if level else "", size)
        # Left-aligned: justified lines use word spacing that some extractors read as extra spaces.
        pdf.multi_cell(0, size * 0.5, text, align="L", new_x="LMARGIN", new_y="NEXT")
        pdf.ln(3)
    pdf.output(str(path))


def main() -> None:
    parts = blocks((HERE / "handbook.md").read_text(encoding="utf-8"))
    write_docx(parts, HERE / "handbook.docx")
    write_pdf(parts, HERE / "handbook.pdf")
    print(f"wrote handbook.docx and handbook.pdf ({len(parts)} blocks)")


if __name__ == "__main__":
    main()
