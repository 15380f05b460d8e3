"""Render records into token ids and loss labels, with the base model's own chat template.

Chat records: the loss covers the assistant turns only (their content and their
end-of-turn token), so the model learns to answer, not to imitate the user.
Document records: the loss covers every token.

How the assistant spans are found: for each assistant turn, the conversation up to
that turn is rendered with ``add_generation_prompt=True`` (everything the model sees
before it starts answering) and again including the turn; the characters in between
are the answer. Tokens are mapped to characters through the fast tokenizer's offset
mapping. This needs a template that renders the start of a conversation as a prefix
of the whole, which is checked rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from appliance.data.ingest.records import Record

IGNORE = -100


def last_answer(input_ids: list[int], labels: list[int]) -> tuple[list[int], list[int]] | None:
    """(everything before the last trained span, that span): a conversation's last question
    as the model sees it, and the answer it was trained to give; None if nothing is trained."""
    end = max((i for i, label in enumerate(labels) if label != IGNORE), default=None)
    if end is None:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return input_ids[:start], input_ids[start : end + 1]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


class RenderError(ValueError):
    pass


def chat_text_and_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant answers.

    A span runs from where the model starts answering to the end of the answer's
    end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>`` ...): that token
    is what teaches the model to stop. Whatever a template adds after it (a newline,
    Phi-3's closing ``<|endoftext|>``) is not the model's to produce.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    specials = _special_tokens(tokenizer)
    spans: list[tuple[int, int]] = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(before) or not full.startswith(before):
            raise RenderError("the chat template does not render a conversation's beginning as a prefix of it")
        turn_text = _common_prefix(upto, full)[len(before) :]
        content = turn["content"].strip()
        at = turn_text.find(content)
        if at < 0:
            raise RenderError("the chat template changes the answer text; cannot tell which tokens to train")
        end = at + len(content)
        eot = next((tok for tok in specials if turn_text.startswith(tok, end)), None)
        end = end + len(eot) if eot else len(turn_text.rstrip())
        spans.append((len(before), len(before) + end))
    return full, spans


def _special_tokens(tokenizer: Any) -> list[str]:
    names = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
    names |= set(tokenizer.all_special_tokens)
    return sorted((n for n in names if n), key=len, reverse=True)  # longest first: no partial matches


def _common_prefix(a: str, b: str) -> str:
    n = min(len(a), len(b))
    i = next((k for k in range(n) if a[k] != b[k]), n)
    return a[:i]


def render(
    tokenizer: Any, record: Record, max_tokens: int, too_long: Literal["truncate", "reject"] = "reject"
) -> Example:
    if record.kind == "chat":
        text, spans = chat_text_and_spans(tokenizer, record.body["messages"])
    else:
        text = record.body["text"] + (tokenizer.eos_token or "")
        spans = [(0, len(text))]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [tok if _inside(start, spans) else IGNORE for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    if len(ids) > max_tokens:
        if too_long == "reject":
            raise RenderError(f"{len(ids)} tokens, longer than the {max_tokens}-token training context")
        ids, labels = ids[:max_tokens], labels[:max_tokens]
    labels[0] = IGNORE  # nothing predicts the first token (and in a packed row it must not see the previous example)
    if not any(label != IGNORE for label in labels):
        raise RenderError("no tokens to learn from after rendering")
    return Example(ids, labels)


def _inside(start: int, spans: list[tuple[int, int]]) -> bool:
    return any(lo <= start < hi for lo, hi in spans)
