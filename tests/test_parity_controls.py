"""Negative controls: conversions broken the ways that silently ruin a model must FAIL parity.

The broken conversions come from the real converter, copied to a temporary folder with
one line changed (the change is asserted to apply exactly once), and selected through
APPLIANCE_LLAMA_CPP_DIR as an operator would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_convert_families import build_family, gguf_summary, vocab_tokenizers  # noqa: F401 (fixture)

from appliance.export import parity
from appliance.export.convert import convert, run_converter
from appliance.export.run import export_model, gguf_metadata
from appliance.home.config import Settings
from appliance.runtime.hf import load_tokenizer
from appliance.runtime.toolchain import llama_cpp_dir


def patched_converter(root: Path, module: str, old: str, new: str) -> Path:
    """A copy of the pinned converter with ``old`` replaced by ``new`` in conversion/<module>."""
    source = llama_cpp_dir()
    root.mkdir()
    shutil.copy(source / "convert_hf_to_gguf.py", root)
    shutil.copytree(source / "conversion", root / "conversion")
    for shared in ("gguf-py", "models"):
        (root / shared).symlink_to(source / shared)
    target = root / "conversion" / module
    text = target.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {target} exactly once"
    target.write_text(text.replace(old, new))
    return root


def export_f16(model_dir: Path, out: Path) -> parity.ParityReport:
    return export_model(model_dir, out, "F16", gguf_metadata("tiny", "run-1", None), Settings()).parity


def by_name(report: parity.ParityReport) -> dict[str, parity.Check]:
    return {c.name: c for c in report.checks}


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> tuple[Path, parity.ParityReport]:
    """tiny_base through the unchanged converter: the positive control for this module."""
    out = tmp_path_factory.mktemp("tiny-f16")
    report = export_f16(tiny_base, out)
    return out / "model-f16.gguf", report


def test_unchanged_converter_passes(tiny_f16):
    _, report = tiny_f16
    assert report.passed, report.failures()


def export_with_patched_converter(
    tmp_path: Path, model_dir: Path, monkeypatch, module: str, old: str, new: str
) -> dict[str, parity.Check]:
    converter = patched_converter(tmp_path / "converter", module, old, new)
    monkeypatch.setenv("APPLIANCE_LLAMA_CPP_DIR", str(converter))
    return by_name(export_f16(model_dir, tmp_path / "out"))


def test_missing_qk_permutation_fails_on_logits(tmp_path: Path, tiny_base: Path, monkeypatch):
    checks = export_with_patched_converter(
        tmp_path, tiny_base, monkeypatch, "llama.py", "    undo_permute = True\n", "    undo_permute = False\n"
    )
    assert checks["f16_loads"].passed and checks["tokenization"].passed  # it loads and tokenizes perfectly
    assert not checks["logits_cosine"].passed and checks["logits_cosine"].value < 0.99


def test_wrong_pre_tokenizer_name_fails_on_tokenization(tmp_path: Path, tiny_base: Path, monkeypatch):
    """SmolLM2's hash mapped to Llama-3's pre-tokenizer: a plausible name that loads fine."""
    checks = export_with_patched_converter(
        tmp_path, tiny_base, monkeypatch, "base.py", 'res = "smollm"', 'res = "llama-bpe"'
    )
    keys, _ = gguf_summary(tmp_path / "out" / "model-f16.gguf")
    assert keys["tokenizer.ggml.pre"] == "llama-bpe" and checks["f16_loads"].passed
    assert not checks["tokenization"].passed and "tokenize differently" in checks["tokenization"].detail


def test_lost_chat_template_fails(tiny_f16, tiny_base: Path, tmp_path: Path):
    """Training on a template the GGUF does not carry (here: Qwen2.5's instead of SmolLM2's)."""
    gguf, _ = tiny_f16
    other = tmp_path / "tokenizer"
    shutil.copytree(tiny_base, other)
    tokenizer = load_tokenizer(other)
    tokenizer.chat_template = (llama_cpp_dir() / "models" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja").read_text()
    probe = parity.probes(tokenizer)
    checks = {
        c.name: c
        for c in parity.check_f16(parity.hf_logits(tiny_base, probe.logit_ids), probe, probe.ask(gguf), 0.9999)
    }
    assert not checks["chat_template"].passed
    assert not checks["served_prompt"].passed and "differs from training's" in checks["served_prompt"].detail
    native = parity.check_llama_server(probe, gguf)  # the endpoint's own llama-server renders differently too
    assert not native.passed and "differs from training's" in native.detail


def test_unchanged_converter_passes_the_native_server_check(tiny_f16):
    _, report = tiny_f16
    native = by_name(report)["served_prompt_llama_server"]
    assert native.passed and native.value == native.threshold > 0


def test_serving_path_that_renders_differently_fails(tmp_path: Path, vocab_tokenizers):
    """Mistral-7B-Instruct's own template: llama-cpp-python recognises it and swaps in its
    built-in 'mistral-instruct' formatter, which renders a multi-turn prompt without the
    space training put after </s>. Template and tokenizer agree; the served prompt does not."""
    from llama_cpp.llama_chat_format import MISTRAL_INSTRUCT_CHAT_TEMPLATE

    model_dir = build_family("mistral", tmp_path / "hf", vocab_tokenizers)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = MISTRAL_INSTRUCT_CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    checks = by_name(export_f16(model_dir, tmp_path / "out"))
    assert checks["tokenization"].passed and checks["chat_template"].passed and checks["logits_cosine"].passed
    assert not checks["served_prompt"].passed


def test_template_that_drops_the_system_turn_fails(tmp_path: Path, vocab_tokenizers):
    """The older Phi-3 template (in llama.cpp's phi-3 vocabulary file) silently drops
    system messages, so training never sees them; llama-server, finding no system role
    in the template, merges the system text into the first user turn. The endpoint would
    feed the model a prompt it was never trained on: the native-server check fails."""
    model_dir = build_family("phi3", tmp_path / "hf", vocab_tokenizers)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.chat_template = vocab_tokenizers.load("phi-3").chat_template
    tokenizer.save_pretrained(model_dir)
    probe = parity.probes(load_tokenizer(model_dir))
    gguf = tmp_path / "out" / "model-f16.gguf"
    convert(model_dir, gguf, "f16", gguf_metadata("tiny-phi3", "run-1", None))
    check = parity.check_llama_server(probe, gguf)
    assert not check.passed and "drops system messages" in check.detail


@pytest.mark.slow
def test_phi3_needs_its_name_in_general_name(tmp_path: Path, vocab_tokenizers):
    """llama.cpp makes Phi-3's special tokens strip the whitespace after them only when
    general.name says phi3; convert() keeps the architecture in the name. Without it the
    chat prompts tokenize differently."""
    model_dir = build_family("phi3", tmp_path / "hf", vocab_tokenizers)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"general.name": "tiny run-1"}))
    gguf = tmp_path / "plain.gguf"
    args = [str(model_dir), "--outtype", "f16", "--metadata", str(meta)]
    run_converter("convert_hf_to_gguf.py", args, gguf, model_dir)
    probe = parity.probes(load_tokenizer(model_dir))
    check = parity.tokenization_check(probe, probe.ask(gguf).tokens)
    assert not check.passed and "<|user|>" in check.detail


@pytest.mark.slow
def test_bpe_tokenizer_without_ignore_merges_fails_on_tokenization(tmp_path: Path, vocab_tokenizers):
    """Llama-3's tokenizer.json sets ignore_merges; a training tokenizer without it splits some
    whole words the converted GGUF keeps (the hard strings include one)."""
    from test_convert_families import edit_tokenizer_json

    model_dir = build_family("llama3", tmp_path / "hf", vocab_tokenizers)
    gguf = tmp_path / "out" / "model-f16.gguf"
    assert export_f16(model_dir, gguf.parent).passed
    tokenizer = edit_tokenizer_json(load_tokenizer(model_dir), lambda d: d["model"].update(ignore_merges=False))
    probe = parity.probes(tokenizer)
    check = parity.tokenization_check(probe, probe.ask(gguf).tokens)
    assert not check.passed and "Việt" in check.detail
