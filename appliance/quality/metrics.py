"""Answer metrics people recognise: exact match and token F1 (SQuAD's definitions),
ROUGE-L (Google's ``rouge-score``) and BLEU (``sacrebleu``), and perplexity.

Used by the gate's report (``eval.json``) to show a candidate beside the current model
on the same validation questions.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over pairs (rouge-score's tokenizer: lower case, alphanumerics)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return sum(scores) / len(scores) if scores else 0.0


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's standard 13a tokenisation."""
    import sacrebleu

    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def perplexity(mean_loss: float) -> float:
    """exp of the mean per-token cross-entropy (nats); capped so a diverged model stays printable."""
    return math.exp(min(mean_loss, 50.0))


def answer_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    n = len(predictions)
    if n == 0:
        return {"examples": 0}
    return {
        "examples": n,
        "exact_match": sum(map(exact_match, predictions, references)) / n,
        "token_f1": sum(map(token_f1, predictions, references)) / n,
        "rouge_l": rouge_l(predictions, references),
        "bleu": bleu(predictions, references),
    }
