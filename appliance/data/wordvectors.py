"""Word vectors shipped with the appliance, for the dense half of hybrid retrieval when IT
has named no embedding GGUF (``[grounding] word_vectors``).

WordLlama (MIT, https://github.com/dleemiller/WordLlama) is a static embedding model: token
vectors taken from a large LLM's embedding table and trained contrastively for similarity,
averaged over a text's tokens. Its wheel carries its 256-dimension weights and tokenizer
(16 MB), so it runs with no download, in about a millisecond per question on a CPU. On the
team's handbook, fused with BM25, it finds the answering sentence for 0.80 of the
paraphrased probes in the top 3, against BM25's 0.65 alone: it links words BM25 cannot (ID
card and badge, wages and salaries).

Loaded once per process on first use; a package that is missing or fails to load gives one
log line and retrieval stays BM25 alone.
"""

from __future__ import annotations

import logging
import threading
from importlib import metadata
from pathlib import Path

import numpy as np

from appliance.data.index import FUSION_DEPTH, Hit, Index

log = logging.getLogger("appliance.serve")

CONFIG = "l2_supercat"  # the configuration whose weights the wheel ships
DIM = 256

_lock = threading.Lock()
_model: object | None = None
_failed = False


def identity() -> str:
    """Which model made a stored vector: a new release of the package is a new model."""
    try:
        version = metadata.version("wordllama")
    except metadata.PackageNotFoundError:
        version = "missing"
    return f"wordllama-{CONFIG}-{DIM}:{version}"


def _load() -> object | None:
    global _model, _failed
    with _lock:
        if _model is None and not _failed:
            try:
                import wordllama

                # The wheel keeps its files under tokenizers/ and weights/ beside its code, the
                # layout WordLlama expects of a cache folder: pointing cache_dir there (and
                # disable_download) loads them offline; it would otherwise look for tokenizer/.
                folder = Path(wordllama.__file__).parent
                _model = wordllama.WordLlama.load(config=CONFIG, dim=DIM, cache_dir=folder, disable_download=True)
            except Exception as problem:  # noqa: BLE001  (any failure: one line, BM25 alone)
                _failed = True
                log.warning(
                    "the shipped word vectors (wordllama) did not load (%s); retrieving with BM25 alone", problem
                )
        return _model


def available() -> bool:
    return _load() is not None


def embed(texts: list[str]) -> list[list[float]]:
    """Unit-length vectors of ``texts`` (raises when the model did not load)."""
    model = _load()
    if model is None:
        raise RuntimeError("the shipped word vectors did not load")
    return [list(map(float, v)) for v in model.embed(texts, norm=True)]  # type: ignore[attr-defined]


def embed_index(index: Index) -> None:
    """Vectors for every passage of ``index`` that has none from these word vectors yet."""
    index.embed_missing(identity(), embed, batch=256)


def nearest(index: Index, question: str) -> list[Hit]:
    """The passages nearest ``question`` by these word vectors (those embedded so far)."""
    return index.nearest(identity(), np.asarray(embed([question])[0], dtype=np.float32), FUSION_DEPTH)
