"""Runs llama.cpp on a GGUF in a child process and writes what it saw.

Loading a candidate GGUF can crash the process (malformed files have crashed
llama.cpp before: CVE-2024-39720, CVE-2025-53630). Running it here, as
``python -m appliance.runtime.llamacpp_worker REQUEST.json OUT_DIR``, turns a crash into a
failed check instead of a dead appliance.

Request (every key but "model" optional):
  {"model": path, "lora": path, "vocab_only": bool, "threads": n,
   "validate": bool,                read the whole file with gguf-py first (slow on big vocabularies)
   "tokenize": [str, ...],          token ids, no BOS, special tokens parsed
   "chat": [[message, ...], ...],   the token ids the serving path (create_chat_completion) feeds the model
   "logits": [[ids], ...],          full logits, saved as OUT_DIR/logits_<i>.npy (positions x vocab, float32)
   "argmax": [[ids], ...],          the top-1 token at every position (cheap: no logits leave the child)
   "generate": [[ids, n], ...],     greedy continuation of ids, at most n tokens, ending at end-of-generation
   "reply": [[messages, n], ...],   the greedy chat answer as text (at most n tokens): a teacher writing
   "nll": [[ids, labels], ...]}     summed negative log-likelihood of labels[i] (HF convention, -100 = not
                                    scored) predicted at position i-1, and how many were scored
Output: OUT_DIR/result.json. On a file llama.cpp or gguf-py refuses, the worker writes
{"error": "..."} and exits with status 2; any other exit status means it crashed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from gguf import GGUFReader

from appliance.runtime.llamacpp_child import REFUSED


def structure(path: str) -> dict[str, Any]:
    """gguf-py's reading of the file: every tensor must lie inside it."""
    reader = GGUFReader(path)
    size = reader.data.shape[0]
    for tensor in reader.tensors:
        end = tensor.data_offset + tensor.n_bytes
        if end > size or tensor.data.nbytes != tensor.n_bytes:
            raise ValueError(f"tensor {tensor.name} runs past the end of the file ({end} > {size} bytes)")
    arch = reader.fields.get("general.architecture")
    if arch is None:
        raise ValueError("no general.architecture key")
    return {"tensors": len(reader.tensors), "keys": len(reader.fields), "bytes": int(size)}


def served_prompt(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """The ids create_chat_completion hands to generation, caught before any is generated."""
    seen: list[list[int]] = []

    def capture(prompt: Any, **_: Any) -> Any:
        seen.append(list(prompt))
        raise _Captured

    llm.create_completion = capture  # the chat handlers call llama.create_completion(prompt=ids, ...)
    try:
        llm.create_chat_completion(messages=messages, max_tokens=1)
    except _Captured:
        pass
    return seen[0]


class _Captured(Exception):
    pass


def evaluate(llm: Any, ids: list[int]) -> Any:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm: Any, prompt: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        out.append(int(token))
        if len(out) >= max_tokens or llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            break
    return out


def nll(llm: Any, ids: list[int], labels: list[int]) -> list[float]:
    """[summed -log p(label), scored tokens]: the loss the gate compares across models."""
    logits = evaluate(llm, ids).astype(np.float64)
    scored = [i for i in range(1, len(ids)) if labels[i] != -100]
    if not scored:
        return [0.0, 0]
    rows = logits[[i - 1 for i in scored]]
    top = rows.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(rows - top).sum(axis=1)) + top[:, 0]
    picked = rows[np.arange(len(scored)), [labels[i] for i in scored]]
    return [float((log_norm - picked).sum()), len(scored)]


REPLY_CONTEXT = 2048  # a chat reply's prompt is not known in tokens before the model loads


def load(request: dict[str, Any]) -> Any:
    sequences = request.get("logits", []) + request.get("argmax", []) + [ids for ids, _ in request.get("nll", [])]
    longest = max([len(ids) for ids in sequences] + [len(ids) + n for ids, n in request.get("generate", [])], default=0)
    context = max(512, longest + 8, REPLY_CONTEXT if request.get("reply") else 0)
    # Half the cores unless told, for prompts too (llama-cpp-python would use all of them for
    # batches): llama.cpp's threads spin-wait, and on a busy machine one thread more than is
    # free made a 60-token prompt take 9.5 s instead of 0.2 s here.
    threads = request.get("threads") or max(1, len(os.sched_getaffinity(0)) // 2)
    return llama_cpp.Llama(
        model_path=request["model"],
        vocab_only=bool(request.get("vocab_only")),
        lora_path=request.get("lora"),
        logits_all=bool(sequences),
        n_ctx=context,
        n_batch=context,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def answer(llm: Any, request: dict[str, Any], out: Path) -> dict[str, Any]:
    for i, ids in enumerate(request.get("logits", [])):
        np.save(out / f"logits_{i}.npy", evaluate(llm, ids))
    return {
        "metadata": dict(llm.metadata),
        "n_vocab": llm.n_vocab(),
        "tokens": [
            llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in request.get("tokenize", [])
        ],
        "argmax": [evaluate(llm, ids).argmax(-1).tolist() for ids in request.get("argmax", [])],
        "generated": [greedy(llm, ids, n) for ids, n in request.get("generate", [])],
        "nll": [nll(llm, ids, labels) for ids, labels in request.get("nll", [])],
        "chat": [served_prompt(llm, messages) for messages in request.get("chat", [])],
        "replies": [reply(llm, messages, n) for messages, n in request.get("reply", [])],
    }


def reply(llm: Any, messages: list[dict[str, str]], max_tokens: int) -> str:
    prompt = served_prompt(llm, messages)[-(REPLY_CONTEXT - max_tokens) :]  # a long prompt keeps its end
    return llm.detokenize(greedy(llm, prompt, max_tokens)).decode("utf-8", errors="replace")


def main(request_path: str, out_dir: str) -> int:
    request = json.loads(Path(request_path).read_text())
    out = Path(out_dir)
    checked: dict[str, Any] = {}
    if request.get("validate"):
        try:
            checked = structure(request["model"])
        except Exception as exc:  # gguf-py raises many types on malformed files
            return _refuse(out, f"gguf-py cannot read it: {type(exc).__name__}: {exc}")
    try:
        llm = load(request)
    except Exception as exc:  # llama-cpp-python raises ValueError on a file llama.cpp refuses
        return _refuse(out, f"llama.cpp cannot load it: {exc}")
    (out / "result.json").write_text(json.dumps({"structure": checked, **answer(llm, request, out)}))
    return 0


def _refuse(out: Path, reason: str) -> int:
    (out / "result.json").write_text(json.dumps({"error": reason}))
    return REFUSED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
