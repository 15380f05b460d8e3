"""Runs llama.cpp on a GGUF in a child process and writes what it saw.

Loading a candidate GGUF can crash the process (malformed files have crashed
llama.cpp before: CVE-2024-39720, CVE-2025-53630). Running it here, as
``python -m appliance.llamacpp_worker REQUEST.json OUT_DIR``, turns a crash into a
failed check instead of a dead appliance.

Request: {"model": path, "tokenize": [str, ...], "logits": [[ids], ...], "threads": n}
Output: OUT_DIR/result.json ({"tokens": [[ids]...], "metadata": {...}}) and
OUT_DIR/logits_<i>.npy (positions x vocab, float32).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(request_path: str, out_dir: str) -> int:
    import numpy as np
    from llama_cpp import Llama

    request = json.loads(Path(request_path).read_text())
    out = Path(out_dir)
    need_logits = bool(request.get("logits"))
    longest = max((len(ids) for ids in request.get("logits", [])), default=0)
    llm = Llama(model_path=request["model"], vocab_only=not need_logits, logits_all=need_logits,
                n_ctx=max(512, longest + 8), n_batch=max(512, longest + 8), n_threads=request.get("threads"),
                verbose=False)
    result: dict = {"metadata": dict(llm.metadata), "n_vocab": llm.n_vocab()}
    result["tokens"] = [llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
                        for s in request.get("tokenize", [])]
    for i, ids in enumerate(request.get("logits", [])):
        llm.reset()
        llm.eval(ids)
        np.save(out / f"logits_{i}.npy", np.asarray(llm.scores[: len(ids)], dtype=np.float32))
    (out / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
