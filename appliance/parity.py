"""The parity check every exported model passes (gguf-conversion.md, "The parity check").

1. Tokenization: the training tokenizer and llama.cpp give identical ids on hard strings
   and on the rendered chat prompt.
2. Chat template: the GGUF carries exactly the tokenizer's template.
3. Logits: llama.cpp on the f16 GGUF agrees with the HF model (cosine per position).
4. The quantized file, against the f16 file: top-1 agreement and KL divergence.
5. Every llama.cpp load happens in a child process; a crash there fails the check.

The result is written to the run's ``parity.json``; the promotion gate reads it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import llamacpp_child
from .events import Emit, StageFinished, StageStarted, ignore

STAGE = "parity"

HARD_STRINGS = [
    "Hello world",
    "   leading spaces and\ttabs\n\nand blank lines   ",
    "Numbers: 0 7 42 1234567 3.14159 -0.5e10 2026-11-28",
    "Accents: café naïve résumé Ærø Zürich Łódź",
    "CJK: 病院の方針 医院政策 병원 정책",
    "Emoji: 🏥💊🩺 👩🏽‍⚕️",
    "Code: def f(x):\n    return {'a': [1, 2]} if x else None  # comment",
    "Mixed  whitespace\r\n\u00a0non-breaking\u2009thin",
    "Dosage 2.5mg/kg q8h; BP 120/80 mmHg; SpO2 98%",
]
PROBE_CONVERSATION = [
    {"role": "system", "content": "You answer questions about the clinic's policies."},
    {"role": "user", "content": "Which extension reaches the on-call pharmacist after 10 pm?"},
]
LOGIT_PROMPTS = [
    "The patient was admitted on Tuesday with",
    "Policy 4.2: All visitors must sign in at the front desk before",
]
# Quantized vs f16, measured on short prompts; looser for smaller types.
QUANT_THRESHOLDS = {
    "Q4_K_M": {"top1": 0.70, "kl": 0.50},
    "Q5_K_M": {"top1": 0.80, "kl": 0.25},
    "Q6_K": {"top1": 0.85, "kl": 0.15},
    "Q8_0": {"top1": 0.90, "kl": 0.05},
    "F16": {"top1": 0.99, "kl": 0.001},
}


@dataclass
class Check:
    name: str
    passed: bool
    value: Any
    threshold: Any
    detail: str = ""


@dataclass
class ParityReport:
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail or c.value}" for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "seconds": self.seconds, "checks": [asdict(c) for c in self.checks]}


def check(hf_dir: Path, f16: Path, quantized: Path | None, qtype: str | None, min_cosine: float = 0.9999,
          emit: Emit = ignore) -> ParityReport:
    from .hf import load_tokenizer

    started = time.monotonic()
    emit(StageStarted(STAGE, description="Checking the GGUF against the trained model"))
    report = ParityReport()
    tokenizer = load_tokenizer(hf_dir)
    prompt = tokenizer.apply_chat_template(PROBE_CONVERSATION, tokenize=False, add_generation_prompt=True)
    strings = HARD_STRINGS + [prompt]
    # Exactly the ids the served model sees: the rendered chat prompt, and plain text.
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in [prompt, *LOGIT_PROMPTS]]

    f16_run = llamacpp_child.run(f16, tokenize=strings, logits=prompt_ids)
    report.checks.append(Check("f16_loads", f16_run.ok, f16_run.ok, True, f16_run.error))
    if f16_run.ok:
        report.checks.append(_tokenization(tokenizer, strings, f16_run.tokens))
        report.checks.append(_template(tokenizer, f16_run.metadata))
        report.checks.append(_logits(hf_dir, prompt_ids, f16_run.logits, min_cosine))
    if quantized is not None and qtype is not None:
        q_run = llamacpp_child.run(quantized, tokenize=strings, logits=prompt_ids)
        report.checks.append(Check("quantized_loads", q_run.ok, q_run.ok, True, q_run.error))
        if q_run.ok and f16_run.ok:
            report.checks.extend(_quantized(f16_run.logits, q_run.logits, qtype))
    report.seconds = time.monotonic() - started
    verdict = "passed" if report.passed else "FAILED: " + "; ".join(report.failures())
    emit(StageFinished(STAGE, summary=f"parity {verdict}", seconds=report.seconds))
    return report


def _tokenization(tokenizer: Any, strings: list[str], llama_tokens: list[list[int]]) -> Check:
    mismatched = [s for s, ids in zip(strings, llama_tokens)
                  if tokenizer(s, add_special_tokens=False)["input_ids"] != ids]
    detail = f"{len(mismatched)} of {len(strings)} strings tokenize differently, e.g. {mismatched[0]!r}" if mismatched else ""
    return Check("tokenization", not mismatched, len(strings) - len(mismatched), len(strings), detail)


def _template(tokenizer: Any, metadata: dict[str, str]) -> Check:
    gguf_template = metadata.get("tokenizer.chat_template")
    same = gguf_template == tokenizer.chat_template
    return Check("chat_template", same, same, True, "" if same else "the GGUF's chat template differs from the tokenizer's")


def _logits(hf_dir: Path, prompt_ids: list[list[int]], llama_logits: list[np.ndarray], min_cosine: float) -> Check:
    import torch

    from .hf import load_causal_lm

    model = load_causal_lm(hf_dir, dtype=torch.float32)
    model.eval()
    cosines = []
    with torch.no_grad():
        for ids, theirs in zip(prompt_ids, llama_logits):
            ours = model(torch.tensor([ids])).logits[0].float().numpy()
            num = (ours * theirs).sum(-1)
            den = np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1)
            cosines.append(float((num / den).min()))
    worst = min(cosines)
    return Check("logits_cosine", worst >= min_cosine, round(worst, 6), min_cosine,
                 "" if worst >= min_cosine else f"llama.cpp logits differ from the trained model (cosine {worst:.4f})")


def _quantized(f16_logits: list[np.ndarray], q_logits: list[np.ndarray], qtype: str) -> list[Check]:
    limits = QUANT_THRESHOLDS[qtype]
    top1 = float(np.mean(np.concatenate([(a.argmax(-1) == b.argmax(-1)) for a, b in zip(f16_logits, q_logits)])))
    kl = float(np.mean(np.concatenate([_kl(a, b) for a, b in zip(f16_logits, q_logits)])))
    return [
        Check(f"{qtype}_top1_agreement", top1 >= limits["top1"], round(top1, 4), limits["top1"]),
        Check(f"{qtype}_kl_divergence", kl <= limits["kl"], round(kl, 5), limits["kl"]),
    ]


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) per position, P the reference (f16)."""
    p = _log_softmax(p_logits)
    q = _log_softmax(q_logits)
    return (np.exp(p) * (p - q)).sum(-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
