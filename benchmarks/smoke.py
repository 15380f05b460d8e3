"""What the benchmarks' ``--smoke`` size shares: the tests' tiny random model.

A smoke run takes the same code path as the real benchmark at a size that finishes in
seconds, so a benchmark that no longer runs is caught by the fast test tier
(tests/test_benchmarks.py) instead of on the day someone wants its figures.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_BASE_ENV = "BENCH_TINY_BASE"  # a tiny base already built (the tests pass their fixture's)


def smoke_base(work: Path) -> Path:
    """The tiny base named by $BENCH_TINY_BASE, else one built into ``work``/tiny (about 30 s
    on two busy cores, mostly reading the tokenizer out of the GGUF and pretraining)."""
    if given := os.environ.get(TINY_BASE_ENV):
        return Path(given)
    return tiny_base(work / "tiny")


def tiny_base(out: Path) -> Path:
    """tests/conftest.py's ``tiny_base`` outside pytest (a fixture cannot be called): the
    same 2-layer, 64-wide Llama with SmolLM2's real tokenizer, built by conftest's own helper
    and saved as an HF checkpoint in ``out``."""
    from transformers import AutoTokenizer

    from appliance.training.basemodel import embedded_gguf

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import save_tiny_llama

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    save_tiny_llama(tokenizer, out)
    return out
