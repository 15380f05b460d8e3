"""Every supported architecture, converted with the pinned converter and parity-checked.

Each family is a tiny random model built here with its family's real tokenizer, taken
from the vocabulary-only GGUFs in the converter folder's models/ (through transformers'
GGUF loader, then given back what that loader drops and the real tokenizer.json files
carry: Llama-3's BOS and ignore_merges, SentencePiece's legacy normalizer, Phi-3's
rstrip flags) and a real chat template from models/templates/. Before anything is
converted, each tokenizer must reproduce llama.cpp's own test vectors for its vocabulary.

The big-vocabulary BPE families (Llama-3, Qwen2, Qwen3) cost about half a minute each
on two cores (reading a 128k-150k vocabulary GGUF); they run in the slow tier.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.contract.errors import ExportError
from appliance.export.convert import SUPPORTED_ARCHITECTURES, convert
from appliance.export.run import export_model, gguf_metadata
from appliance.home.config import Settings
from appliance.runtime.toolchain import llama_cpp_dir

VOCAB = llama_cpp_dir() / "models"
TEMPLATES = VOCAB / "templates"
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    initializer_range=0.2,
)
GEMMA_TURNS = ["<start_of_turn>", "<end_of_turn>"]


# --- tokenizers from the converter folder's vocabulary GGUFs -------------------------------


class VocabTokenizers:
    """transformers' reading of ggml-vocab-<name>.gguf, saved once per session (a
    128k-token vocabulary takes transformers ~10 s to read)."""

    def __init__(self, root: Path):
        self.root = root

    def load(self, name: str) -> Any:
        from transformers import AutoTokenizer

        saved = self.root / name
        if not saved.exists():
            tokenizer = AutoTokenizer.from_pretrained(VOCAB, gguf_file=f"ggml-vocab-{name}.gguf", local_files_only=True)
            tokenizer.save_pretrained(saved)
        return AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="session")
def vocab_tokenizers(tmp_path_factory: pytest.TempPathFactory) -> VocabTokenizers:
    return VocabTokenizers(tmp_path_factory.mktemp("vocab-tokenizers"))


def edit_tokenizer_json(tokenizer: Any, change: Callable[[dict], None]) -> Any:
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    change(data)
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def llama3_tokenizer(vocab: VocabTokenizers) -> Any:
    """As Meta ships it: BOS added, whole-word vocabulary hits before merges (ignore_merges),
    and no extra <|endoftext|> (transformers' GGUF loader appends one past the vocabulary)."""

    def change(data: dict) -> None:
        size = len(data["model"]["vocab"])
        data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < size]
        data["model"]["ignore_merges"] = True
        bos = "<|begin_of_text|>"
        data["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [128000], "tokens": [bos]}},
        }

    tokenizer = edit_tokenizer_json(vocab.load("llama-bpe"), change)
    tokenizer.chat_template = (TEMPLATES / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()
    return tokenizer


def sentencepiece_tokenizer(vocab: VocabTokenizers, name: str, dummy_prefix: bool = True) -> Any:
    """The normalizer SentencePiece tokenizer.json files carry (Llama 2, Mistral 7B, Phi-3:
    a dummy prefix on every segment); Gemma's SentencePiece model adds none."""
    from tokenizers import normalizers

    tokenizer = vocab.load(name)
    steps = [normalizers.Prepend("▁")] if dummy_prefix else []
    tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tokenizer.backend_tokenizer.pre_tokenizer = None
    return tokenizer


def phi3_tokenizer(vocab: VocabTokenizers) -> Any:
    """Phi-3's special tokens swallow the whitespace after them, as in Microsoft's tokenizer.json."""

    def change(data: dict) -> None:
        for token in data["added_tokens"]:
            if token["special"]:
                token["rstrip"] = token["content"] not in ("<unk>", "<s>", "<|endoftext|>")
        # No BOS outside the template, consistently: Phi-3.5's template writes none, and a
        # post-processor adding one makes llama.cpp prepend a BOS the training prompts never
        # had (the native-server parity check refuses such a model).
        data["post_processor"] = None

    tokenizer = edit_tokenizer_json(sentencepiece_tokenizer(vocab, "phi-3"), change)
    # Phi-3.5-mini's template: the vocabulary file's older Phi-3 template drops system
    # messages, which llama-server would instead merge into the first user turn (see
    # tests/test_parity_controls.py::test_template_that_drops_the_system_turn_fails).
    tokenizer.chat_template = (TEMPLATES / "microsoft-Phi-3.5-mini-instruct.jinja").read_text()
    return tokenizer


def gemma_tokenizer(vocab: VocabTokenizers) -> Any:
    tokenizer = sentencepiece_tokenizer(vocab, "llama-spm", dummy_prefix=False)
    tokenizer.add_special_tokens({"additional_special_tokens": GEMMA_TURNS})
    tokenizer.chat_template = (TEMPLATES / "google-gemma-2-2b-it.jinja").read_text()
    return tokenizer


def write_sentencepiece_model(out: Path, dummy_prefix: bool = True, extra_control: list[str] | None = None) -> None:
    """tokenizer.model rebuilt from ggml-vocab-llama-spm.gguf: a BPE SentencePiece model is
    its pieces, scores and types plus the normalizer flags (it reproduces llama.cpp's test
    vectors exactly). Converters of Mistral, Gemma and Phi-3 read this file."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as pb

    fields = gguf.GGUFReader(VOCAB / "ggml-vocab-llama-spm.gguf").fields
    values = lambda key: [fields[key].parts[i] for i in fields[key].data]  # noqa: E731
    kinds = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
    model = pb.ModelProto()
    spec = model.trainer_spec
    spec.model_type, spec.byte_fallback = pb.TrainerSpec.BPE, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = (
        "identity",
        dummy_prefix,
        False,
        True,
    )
    pieces = zip(values("tokenizer.ggml.tokens"), values("tokenizer.ggml.scores"), values("tokenizer.ggml.token_type"))
    for text, score, kind in pieces:
        model.pieces.add(
            piece=bytes(text).decode(),
            score=float(score[0]),
            type=getattr(pb.ModelProto.SentencePiece, kinds[int(kind[0])]),
        )
    for text in extra_control or []:
        model.pieces.add(piece=text, score=0.0, type=pb.ModelProto.SentencePiece.CONTROL)
    spec.vocab_size = len(model.pieces)
    (out / "tokenizer.model").write_bytes(model.SerializeToString())


# --- the families ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    config: Callable[[], Any]  # a transformers config for a tiny model
    tokenizer: Callable[[VocabTokenizers], Any]
    vectors: str | None  # ggml-vocab-<name>.gguf.inp/.out the tokenizer must reproduce
    sentencepiece: dict[str, Any] | None = None  # write_sentencepiece_model arguments
    expect: dict[str, Any] = field(default_factory=dict)  # GGUF keys and their values
    tensors: tuple[str, ...] = ()  # tensors the GGUF must hold
    no_tensors: tuple[str, ...] = ()  # and must not


def _llama3() -> Any:
    from transformers import LlamaConfig

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    return LlamaConfig(vocab_size=128256, tie_word_embeddings=False, rope_parameters=rope, **SMALL)


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(vocab_size=32000, sliding_window=None, **SMALL)


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, tie_word_embeddings=True, **SMALL)


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=151936, head_dim=16, tie_word_embeddings=True, **SMALL)


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    # query_pre_attn_scalar = head_dim as in every released Gemma 3 but 27B: llama.cpp
    # assumes it (the logits check fails otherwise, cosine 0.85).
    return Gemma3TextConfig(vocab_size=32002, head_dim=16, query_pre_attn_scalar=16, sliding_window=512, **SMALL)


def _phi3() -> Any:
    from transformers import Phi3Config

    return Phi3Config(vocab_size=32064, pad_token_id=32000, **SMALL)


def _with_template(make: Callable[[VocabTokenizers], Any], template: str) -> Callable[[VocabTokenizers], Any]:
    def build(vocab: VocabTokenizers) -> Any:
        tokenizer = make(vocab)
        tokenizer.chat_template = (TEMPLATES / template).read_text()
        return tokenizer

    return build


FAMILIES = {
    "llama3": Family(
        _llama3,
        llama3_tokenizer,
        "llama-bpe",
        expect={"general.architecture": "llama", "tokenizer.ggml.pre": "llama-bpe"},
        tensors=("rope_freqs.weight", "output.weight"),
    ),
    "mistral": Family(
        _mistral,
        _with_template(lambda v: sentencepiece_tokenizer(v, "llama-spm"), "mistralai-Mistral-Nemo-Instruct-2407.jinja"),
        "llama-spm",
        {},
        {"general.architecture": "llama", "tokenizer.ggml.model": "llama"},
    ),
    "qwen2": Family(
        _qwen2,
        lambda v: v.load("qwen2"),
        "qwen2",
        expect={"general.architecture": "qwen2", "tokenizer.ggml.pre": "qwen2"},
        tensors=("blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"),
        no_tensors=("output.weight",),
    ),
    "qwen3": Family(
        _qwen3,
        _with_template(lambda v: v.load("qwen2"), "Qwen-Qwen3-0.6B.jinja"),
        "qwen2",
        expect={"general.architecture": "qwen3", "tokenizer.ggml.pre": "qwen2"},
        tensors=("blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"),
        no_tensors=("output.weight",),
    ),
    "gemma3": Family(
        _gemma3,
        gemma_tokenizer,
        None,
        {"dummy_prefix": False, "extra_control": GEMMA_TURNS},
        {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.add_space_prefix": False},
    ),
    "phi3": Family(
        _phi3,
        phi3_tokenizer,
        "phi-3",
        {},
        {"general.architecture": "phi3", "tokenizer.ggml.model": "llama"},
        tensors=("blk.0.attn_qkv.weight",),
    ),
}
SLOW = {"llama3", "qwen2", "qwen3"}


def build_family(name: str, out: Path, vocab: VocabTokenizers) -> Path:
    """A tiny random model of family ``name`` with its tokenizer, saved as an HF folder."""
    import torch
    from transformers import AutoModelForCausalLM

    family = FAMILIES[name]
    tokenizer = family.tokenizer(vocab)
    config = family.config()
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if name == "phi3":  # as Microsoft's tokenizer_config.json (transformers 5 does not write the key)
        config_file = out / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "add_bos_token": False}))
    if family.sentencepiece is not None:
        write_sentencepiece_model(out, **family.sentencepiece)
    return out


def vector_mismatches(tokenizer: Any, vocab_name: str) -> list[str]:
    """The strings of llama.cpp's test vectors for this vocabulary that ``tokenizer`` gets wrong."""
    inputs = (VOCAB / f"ggml-vocab-{vocab_name}.gguf.inp").read_text().split("\n__ggml_vocab_test__\n")
    outputs = (VOCAB / f"ggml-vocab-{vocab_name}.gguf.out").read_text().split("\n")
    return [
        text
        for text, ids in zip(inputs, outputs)
        if tokenizer(text, add_special_tokens=False)["input_ids"] != [int(i) for i in ids.split()]
    ]


# --- a GGUF's keys and tensor names, fast (gguf-py takes ~10 s on a 150k vocabulary) ---------


def gguf_summary(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Scalar and string keys (arrays skipped) and tensor names of a GGUF file."""
    data = path.read_bytes()
    _, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data)
    pos, keys = 24, {}
    for _ in range(n_kv):
        key, pos = _string(data, pos)
        (kind,), pos = struct.unpack_from("<I", data, pos), pos + 4
        keys[key], pos = _value(data, pos, kind)
    names = []
    for _ in range(n_tensors):
        name, pos = _string(data, pos)
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * n_dims + 4 + 8
        names.append(name)
    return keys, names


SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _string(data: bytes, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", data, pos)
    return data[pos + 8 : pos + 8 + n].decode(), pos + 8 + n


def _value(data: bytes, pos: int, kind: int) -> tuple[Any, int]:
    if kind == 8:
        return _string(data, pos)
    if kind == 9:  # array: element type, count, elements
        inner, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(count):
            _, pos = _value(data, pos, inner)
        return None, pos
    fmt = "<" + SCALARS[kind]
    return struct.unpack_from(fmt, data, pos)[0], pos + struct.calcsize(fmt)


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FAMILIES])
def test_family_converts_and_passes_parity(name: str, tmp_path: Path, vocab_tokenizers: VocabTokenizers):
    family = FAMILIES[name]
    model_dir = build_family(name, tmp_path / "hf", vocab_tokenizers)
    if family.vectors:
        from transformers import AutoTokenizer

        assert vector_mismatches(AutoTokenizer.from_pretrained(model_dir), family.vectors) == []
    result = export_model(
        model_dir, tmp_path / "gguf", "F16", gguf_metadata(f"tiny-{name}", "run-1", "snap-1"), Settings()
    )
    assert result.parity.passed, result.parity.failures()
    checks = {c.name: c for c in result.parity.checks}
    assert checks["served_prompt"].value >= 1 and checks["logits_cosine"].value >= 0.9999
    keys, tensors = gguf_summary(result.gguf)
    assert {k: keys.get(k) for k in family.expect} == family.expect
    assert set(family.tensors) <= set(tensors) and not set(family.no_tensors) & set(tensors)


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "Gemma2ForCausalLM", "Qwen2MoeForCausalLM"])
def test_architecture_off_the_list_is_refused_before_conversion(arch: str, tmp_path: Path):
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"architectures": [arch]}))
    with pytest.raises(ExportError, match=f"architecture {arch} is not supported.*supported: .*LlamaForCausalLM"):
        convert(model_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_supported_list_is_exactly_the_tested_families():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL_LM

    assert {CAUSAL_LM[f.config().model_type] for f in FAMILIES.values()} == set(SUPPORTED_ARCHITECTURES)


def test_unrecognised_pre_tokenizer_is_refused(tmp_path: Path, tiny_base: Path):
    """SmolLM2's tokenizer with one change to its pre-tokenization: the converter's hash
    table does not know it, and the export stops rather than guess a name."""
    model_dir = tmp_path / "hf"
    shutil.copytree(tiny_base, model_dir)
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Lowercase"}
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ExportError, match="pre-tokenizer is not one llama.cpp's converter recognises"):
        convert(model_dir, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
