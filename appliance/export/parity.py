"""The parity check every exported model passes (gguf-conversion.md, "The parity check").

1. Tokenization: the training tokenizer and llama.cpp give identical ids on hard strings
   and on the rendered chat prompts.
2. Chat template: the GGUF carries exactly the tokenizer's template, and the prompt the
   serving path renders (llama-cpp-python's create_chat_completion) is token-identical
   to the one training rendered.
3. Logits: llama.cpp on the f16 GGUF agrees with the HF model (cosine per position).
4. A quantized file, against the f16 file: top-1 agreement, KL divergence and, when a
   snapshot is at hand, recall of its validation answers.
5. Every llama.cpp load happens in a child process, after gguf-py has read the file
   there; a crash or a refusal fails the check.

The result is written to the run's ``parity.json``; the promotion gate reads it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from appliance.contract.errors import ServeError
from appliance.runtime import llamacpp_child
from appliance.runtime.hf import load_causal_lm
from appliance.runtime.llama_server import Backend, start_async
from appliance.runtime.llamacpp_child import ChildResult
from appliance.training.render import Example, last_answer

STAGE = "parity"
HARD_STRINGS = [
    "Hello world",
    "   leading spaces and\ttabs\n\nand blank lines   ",
    "Numbers: 0 7 42 1234567 3.14159 -0.5e10 2026-11-28",
    "Accents: café naïve résumé Ærø Zürich Łódź",
    "Vietnamese: Cửa Việt, tiếng Việt",  # whole-word vocabulary hits before merges (Llama-3's ignore_merges)
    "CJK: 病院の方針 医院政策 병원 정책",
    "Emoji: 🏥💊🩺 👩🏽‍⚕️",
    "Code: def f(x):\n    return {'a': [1, 2]} if x else None  # comment",
    "Mixed  whitespace\r\n\u00a0non-breaking\u2009thin",
    "Dosage 2.5mg/kg q8h; BP 120/80 mmHg; SpO2 98%",
]
# A template may refuse one of these (some reject a system turn); it must render at least one.
CONVERSATIONS = [
    [
        {"role": "system", "content": "You answer questions about the clinic's policies."},
        {"role": "user", "content": "Which extension reaches the on-call pharmacist after 10 pm?"},
    ],
    [
        {"role": "user", "content": "Who signs visitor badges?"},
        {"role": "assistant", "content": "The front desk, from 8 am to 8 pm."},
        {"role": "user", "content": "And  after 8 pm? Ünïcode too."},
    ],
]
LOGIT_PROMPTS = [
    "The patient was admitted on Tuesday with",
    "Policy 4.2: All visitors must sign in at the front desk before",
]
# Quantized vs f16, per type (looser for smaller types): top-1 agreement on the fixed
# prompts and the validation conversations, mean KL divergence on the fixed prompts.
QUANT_THRESHOLDS = {
    "Q4_K_M": {"top1": 0.70, "kl": 0.50},
    "Q5_K_M": {"top1": 0.80, "kl": 0.25},
    "Q6_K": {"top1": 0.85, "kl": 0.15},
    "Q8_0": {"top1": 0.90, "kl": 0.05},
    "F16": {"top1": 0.99, "kl": 0.001},
}
# Recall of the validation answers is the same bar for every type (what the model
# learned must survive, whatever the file size): the quantized file may lose at most
# 10% of f16's recall, or 0.02 where that is more (a few answers' noise).
# Calibrated on the demo model (benchmarks/RESULTS.md): Q4_K_M lost 17% of this recall
# and half the facts it answered at f16 (4/32 against 8/32); Q5_K_M and Q6_K 7-9% and
# one fact or none.
RECALL_KEPT = 0.90
RECALL_NOISE = 0.02
MAX_ANSWER_TOKENS = 48  # greedy tokens generated per validation answer
MIN_ADAPTER_COSINE = 0.999  # llama.cpp applies a LoRA at run time in f16 arithmetic


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


@dataclass
class Probes:
    """What every GGUF is asked, prepared once from the training tokenizer."""

    tokenizer: Any
    conversations: list[list[dict[str, str]]]
    prompts: list[str]  # the conversations, rendered by the training tokenizer's template
    prompt_ids: list[list[int]]
    logit_ids: list[list[int]]
    answers: list[Example] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # why the template refused a conversation

    @property
    def strings(self) -> list[str]:
        return HARD_STRINGS + self.prompts

    def ask(
        self, gguf: Path, threads: int | None = None, lora: Path | None = None, vocab: bool = True, answers: bool = True
    ) -> ChildResult:
        """One child process: load ``gguf`` and collect what the checks compare: always
        the logits of the fixed prompts; with ``vocab`` tokenization and the served chat
        prompts; with ``answers`` the validation conversations (top-1 and greedy answers)."""
        asked = self.answers if answers else []
        splits = [answer_split(a) for a in asked]
        return llamacpp_child.run(
            gguf,
            tokenize=self.strings if vocab else None,
            chat=self.conversations if vocab else None,
            logits=self.logit_ids,
            argmax=[a.input_ids for a in asked],
            generate=[(prompt, len(reference)) for prompt, reference in splits],
            lora=lora,
            threads=threads,
        )


def probes(tokenizer: Any, answers: Sequence[Example] = ()) -> Probes:
    conversations, prompts, refused = [], [], []
    for conversation in CONVERSATIONS:
        try:
            prompts.append(tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True))
            conversations.append(conversation)
        except Exception as exc:  # jinja2 TemplateError from raise_exception, or any template bug
            refused.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids = [encode(p) for p in prompts]
    return Probes(
        tokenizer,
        conversations,
        prompts,
        prompt_ids,
        prompt_ids[:1] + [encode(p) for p in LOGIT_PROMPTS],
        list(answers),
        refused,
    )


# --- the f16 file against the trained model ----------------------------------------------


def check_f16(hf_logits: list[np.ndarray], probe: Probes, run: ChildResult, min_cosine: float) -> list[Check]:
    checks = [Check("f16_loads", run.ok, run.ok, True, run.error)]
    if run.ok:
        checks += [
            tokenization_check(probe, run.tokens),
            _template(probe, run.metadata),
            _served(probe, run.chat),
            _cosine("logits_cosine", hf_logits, run.logits, min_cosine),
        ]
    return checks


def hf_logits(hf_dir: Path, sequences: list[list[int]]) -> list[np.ndarray]:
    model = load_causal_lm(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in sequences]


def tokenization_check(probe: Probes, llama_tokens: list[list[int]]) -> Check:
    strings = probe.strings
    mismatched = [
        s for s, ids in zip(strings, llama_tokens) if probe.tokenizer(s, add_special_tokens=False)["input_ids"] != ids
    ]
    detail = (
        f"{len(mismatched)} of {len(strings)} strings tokenize differently, e.g. {mismatched[0]!r}"
        if mismatched
        else ""
    )
    return Check("tokenization", not mismatched, len(strings) - len(mismatched), len(strings), detail)


def _template(probe: Probes, metadata: dict[str, str]) -> Check:
    ours = probe.tokenizer.chat_template
    if isinstance(ours, dict):  # several named templates: llama.cpp's default is the "default" one
        ours = ours.get("default")
    same = metadata.get("tokenizer.chat_template") == ours
    return Check(
        "chat_template", same, same, True, "" if same else "the GGUF's chat template differs from the tokenizer's"
    )


def _served(probe: Probes, served: list[list[int]]) -> Check:
    """The serving path's prompt ids against training's, conversation by conversation."""
    if not probe.conversations:
        return Check(
            "served_prompt",
            False,
            0,
            1,
            "the chat template renders none of the probe conversations: " + "; ".join(probe.refused),
        )
    differ = [i for i, (ours, theirs) in enumerate(zip(probe.prompt_ids, served)) if ours != theirs]
    detail = ""
    if differ:
        i = differ[0]
        at = next(
            (k for k, (a, b) in enumerate(zip(probe.prompt_ids[i], served[i])) if a != b),
            min(len(probe.prompt_ids[i]), len(served[i])),
        )
        detail = (
            f"the served prompt differs from training's at token {at} of conversation {i + 1} "
            f"(training {probe.prompt_ids[i][at : at + 4]}, served {served[i][at : at + 4]})"
        )
    return Check("served_prompt", not differ, len(served) - len(differ), len(served), detail)


def check_llama_server(probe: Probes, gguf: Path, threads: int | None = None) -> Check:
    """The prompt the endpoint's native llama-server feeds the model (its /apply-template
    rendering, tokenized as its completion path does: special tokens parsed, BOS added
    when the vocabulary asks) against training's, conversation by conversation."""
    longest = max((len(ids) for ids in probe.prompt_ids), default=0)
    backend = Backend(
        "parity",
        gguf,
        slots=1,
        context=max(512, longest + 64),
        threads=threads or max(1, len(os.sched_getaffinity(0)) // 2),
    )
    try:
        start_async(backend, timeout=300).result()
        served = []
        with httpx.Client(
            transport=httpx.HTTPTransport(uds=str(backend.socket)), base_url="http://llama", timeout=60
        ) as client:
            for messages in probe.conversations:
                prompt = client.post("/apply-template", json={"messages": messages}).raise_for_status().json()
                tokens = (
                    client.post(
                        "/tokenize", json={"content": prompt["prompt"], "add_special": True, "parse_special": True}
                    )
                    .raise_for_status()
                    .json()
                )
                served.append(tokens["tokens"])
    except (ServeError, httpx.HTTPError) as exc:
        return Check("served_prompt_llama_server", False, 0, 1, f"llama-server could not render the prompts: {exc}")
    finally:
        backend.stop()
    check = _served(probe, served)
    detail = check.detail
    if not check.passed and _drops_system_turn(probe):
        detail += (
            "; the model's chat template drops system messages, and llama-server merges them into the "
            "first user turn instead, so served prompts would differ from training's"
        )
    return Check("served_prompt_llama_server", check.passed, check.value, check.threshold, detail)


def _drops_system_turn(probe: Probes) -> bool:
    """Whether the training template renders a conversation the same with and without its system message."""
    with_system = next((c for c in probe.conversations if c and c[0]["role"] == "system"), None)
    if with_system is None:
        return False

    def render(conv: list[dict[str, str]]) -> str:
        return probe.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    return render(with_system) == render(with_system[1:])


def _cosine(name: str, ours: list[np.ndarray], theirs: list[np.ndarray], minimum: float) -> Check:
    worst = min(float(_row_cosines(a, b).min()) for a, b in zip(ours, theirs))
    return Check(
        name,
        worst >= minimum,
        round(worst, 6),
        minimum,
        "" if worst >= minimum else f"llama.cpp logits differ from the trained model (cosine {worst:.4f})",
    )


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- a quantized file against the f16 file -----------------------------------------------


def check_quantized(
    reference: ChildResult,
    run: ChildResult,
    qtype: str,
    probe: Probes,
    thresholds: dict[str, dict[str, float]] | None = None,
) -> list[Check]:
    limits = (thresholds or QUANT_THRESHOLDS)[qtype]
    checks = [Check(f"{qtype}_loads", run.ok, run.ok, True, run.error)]
    if not run.ok:
        return checks
    same_top1 = [a.argmax(-1) == b.argmax(-1) for a, b in zip(reference.logits, run.logits)]
    same_top1 += [np.asarray(a) == np.asarray(b) for a, b in zip(reference.argmax, run.argmax)]
    top1 = float(np.mean(np.concatenate(same_top1)))
    kl = float(np.mean(np.concatenate([_kl(a, b) for a, b in zip(reference.logits, run.logits)])))
    checks += [
        Check(
            f"{qtype}_top1_agreement",
            top1 >= limits["top1"],
            round(top1, 4),
            limits["top1"],
            "" if top1 >= limits["top1"] else f"top-1 agrees with f16 on {top1:.1%} of positions",
        ),
        Check(
            f"{qtype}_kl_divergence",
            kl <= limits["kl"],
            round(kl, 5),
            limits["kl"],
            "" if kl <= limits["kl"] else f"mean KL from f16 is {kl:.3f}",
        ),
    ]
    if probe.answers:
        checks.append(
            _recall(
                qtype, answer_recall(probe.answers, reference.generated), answer_recall(probe.answers, run.generated)
            )
        )
    return checks


def answer_split(example: Example) -> tuple[list[int], list[int]]:
    """A validation conversation as (everything before its last answer, that answer's
    first MAX_ANSWER_TOKENS tokens)."""
    prompt, answer = last_answer(example.input_ids, example.labels)  # type: ignore[misc]
    return prompt, answer[:MAX_ANSWER_TOKENS]


def answer_recall(answers: list[Example], generated: list[list[int]]) -> float:
    """How much of each validation answer the model says when asked, greedily: token
    overlap F1 between its answer and the reference, averaged over the answers."""
    scores = [_overlap_f1(answer_split(example)[1], said) for example, said in zip(answers, generated)]
    return sum(scores) / len(scores) if scores else 0.0


def _overlap_f1(reference: list[int], said: list[int]) -> float:
    from collections import Counter

    common = sum((Counter(reference) & Counter(said)).values())
    return 2 * common / (len(reference) + len(said)) if common else 0.0


def _recall(qtype: str, reference: float, candidate: float) -> Check:
    floor = reference - max(reference * (1 - RECALL_KEPT), RECALL_NOISE)
    ok = candidate >= floor
    return Check(
        f"{qtype}_answer_recall",
        ok,
        round(candidate, 4),
        round(floor, 4),
        "" if ok else f"validation answer recall {candidate:.3f} against f16's {reference:.3f}",
    )


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) per position, P the reference (f16)."""
    p = _log_softmax(p_logits)
    q = _log_softmax(q_logits)
    return (np.exp(p) * (p - q)).sum(-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --- a GGUF LoRA adapter on the f16 base, against the merged model ---------------------------


def check_adapter(hf_logits_merged: list[np.ndarray], run: ChildResult) -> list[Check]:
    checks = [Check("adapter_loads", run.ok, run.ok, True, run.error)]
    if run.ok:
        checks.append(_cosine("adapter_logits_cosine", hf_logits_merged, run.logits, MIN_ADAPTER_COSINE))
    return checks
