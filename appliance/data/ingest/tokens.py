"""The base model's tokenizer at ingest: example lengths, and documents cut into chunks.

Lengths are counted on exactly the text training renders (the chat template for
conversations, the text plus end-of-text for documents), so "too long" here means
too long there. The tokenizer is loaded on first use only: importing transformers
takes seconds, and a scan with nothing new needs none of it.

There is no fallback tokenizer. Before a base model is imported, conversations are
stored uncounted (training checks their length anyway) and documents wait in the
inbox: chunks cut by some other tokenizer would become permanent records of the
wrong size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.contract.errors import BaseModelError
from appliance.data.ingest.records import Record

# Room left below the training context for the end-of-text token and for a chunk
# re-tokenizing a little differently once cut out of its document.
CHUNK_MARGIN = 16


class BaseTokenizer:
    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self._tokenizer: Any = None
        self.problem: str | None = None

    @property
    def available(self) -> bool:
        """True when the base's tokenizer is present and loads."""
        if self._tokenizer is None and self.problem is None:
            if not any((self.base_dir / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
                self.problem = f"no base model imported yet ({self.base_dir} holds no tokenizer)"
            else:
                self._load()
        return self._tokenizer is not None

    def count(self, records: list[Record]) -> list[int | None]:
        """Tokens each record takes in training (before any truncation); None where the
        base model's chat template refuses the conversation."""
        tok = self._require()
        texts = [_rendered(tok, record) for record in records]
        renderable = [text for text in texts if text is not None]
        lengths = iter(
            [len(ids) for ids in tok(renderable, add_special_tokens=False)["input_ids"]] if renderable else []
        )
        return [next(lengths) if text is not None else None for text in texts]

    def chunks(self, text: str, size: int, overlap: int) -> list[tuple[str, int]]:
        """Windows of ``size`` tokens, each sharing ``overlap`` with the one before, as
        (exact slice of the original text, tokens it takes in training)."""
        offsets = self._require()(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        step = size - overlap
        out: list[tuple[str, int]] = []
        for start in range(0, len(offsets), step):
            end = min(start + size, len(offsets))
            piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
            if piece:
                out.append((piece, end - start + 1))  # + the end-of-text token training appends
            if end == len(offsets):
                break
        return out

    def _require(self) -> Any:
        if not self.available:
            raise BaseModelError(self.problem or "no base tokenizer")
        return self._tokenizer

    def _load(self) -> None:
        from appliance.runtime.hf import load_tokenizer  # transformers: loaded by the first ingest, not by status

        try:
            self._tokenizer = load_tokenizer(self.base_dir)
        except BaseModelError as exc:
            self.problem = str(exc)


def _rendered(tokenizer: Any, record: Record) -> str | None:
    if record.kind != "chat":
        return record.body["text"] + (tokenizer.eos_token or "")
    try:
        return tokenizer.apply_chat_template(record.body["messages"], tokenize=False)
    except Exception:  # noqa: BLE001  (templates raise whatever their authors chose, e.g. on role order)
        return None


def chunk_shape(chunk_tokens: int, overlap: int, max_tokens: int) -> tuple[int, int]:
    """The chunk size that fits the training context, and an overlap of at most half of it."""
    size = max(8, min(chunk_tokens, max_tokens - CHUNK_MARGIN))
    return size, min(overlap, size // 2)
