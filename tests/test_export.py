"""Export on the tiny Llama: merge, metadata, quantization tries, the GGUF LoRA, corrupt files.

One home is trained (QLoRA, two steps) and exported once with ``--adapter``; the tests
read what that export left and run the real merge, quantizer and llama.cpp on it.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SAMPLE, free_port, tiny_settings
from test_convert_families import gguf_summary

from appliance import __version__
from appliance.cli.command import build_parser
from appliance.cli.init import create_home
from appliance.contract.errors import ExportError, RegistryError
from appliance.engine.local import LocalEngine
from appliance.export import parity
from appliance.export.quantize import choose, ladder
from appliance.export.run import F16_NAME
from appliance.home import registry
from appliance.home.config import ExportSection, load
from appliance.home.fsutil import read_json
from appliance.runtime import llamacpp_child
from appliance.runtime.hf import load_tokenizer
from appliance.serving.server import Server
from appliance.training.merge import merge

IMPOSSIBLE = {"top1": 1.01, "kl": 0.0}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Any]:
    home = create_home(tmp_path_factory.mktemp("export") / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    shutil.copy(SAMPLE / "policies.jsonl", home.inbox / "policies.jsonl")
    engine = LocalEngine(home.root)
    engine.ingest()
    run = engine.train(max_steps=2)
    version = engine.export(run, adapter=True)
    engine.promote(version.version)
    return {
        "home": home,
        "engine": engine,
        "run": home.run(run),
        "version": version,
        "parity": read_json(home.run(run).parity),
    }


def logits(model_dir: Path, adapter: Path | None = None) -> Any:
    import torch
    from peft import PeftModel

    from appliance.runtime.hf import load_causal_lm

    model = load_causal_lm(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = load_tokenizer(model_dir)("Visitors sign in at the front desk before 8 pm.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(ids).logits[0]


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A LoRA on every linear layer with random A and B (a fresh adapter's B is zero, and
    two training steps barely move it: neither would show a merge that drops the update)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from appliance.runtime.hf import load_causal_lm

    torch.manual_seed(1)
    model = get_peft_model(
        load_causal_lm(tiny_base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


# --- merge ------------------------------------------------------------------------------------


def test_merged_logits_equal_base_plus_adapter(tiny_base: Path, random_adapter: Path, tmp_path: Path):
    merged = merge(tiny_base, random_adapter, tmp_path / "merged")
    base_only, with_adapter, from_merged = logits(tiny_base), logits(tiny_base, random_adapter), logits(merged)
    assert (with_adapter - base_only).abs().max() > 1.0  # the adapter matters
    assert (with_adapter - from_merged).abs().max() < 0.02  # float16 rounding of the merged weights, no more
    assert (with_adapter.argmax(-1) == from_merged.argmax(-1)).all()


def test_merge_refuses_nan(tiny_base: Path, random_adapter: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "adapter"
    shutil.copytree(random_adapter, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    name = next(k for k in weights if "lora_B" in k)
    weights[name][0, 0] = float("nan")
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(ExportError, match="NaN"):
        merge(tiny_base, broken, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_qlora_run_merged_into_full_precision_float16(exported):
    from safetensors import safe_open

    with safe_open(exported["run"].merged / "model.safetensors", "pt") as f:
        names = list(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
    assert dtypes == {"F16"}
    assert not [n for n in names if "absmax" in n or "quant" in n]  # no bitsandbytes state left


# --- the exported file -----------------------------------------------------------------------


def test_gguf_records_base_run_snapshot_and_appliance_version(exported):
    import gguf

    run = exported["run"]
    snapshot = read_json(run.root / "train.json")["snapshot"]
    reader = gguf.GGUFReader(registry.gguf_path(exported["home"], exported["version"].version))
    value = lambda key: reader.fields[key].contents()  # noqa: E731
    assert value("general.basename") == "tiny" and value("general.base_model.0.name") == "tiny"
    assert value("general.finetune") == run.id
    assert value("general.dataset.0.name") == f"snapshot {snapshot}"
    assert value("general.quantized_by") == f"appliance {__version__}"
    assert value("general.name") == f"tiny {run.id} (LlamaForCausalLM)"
    assert f"snapshot:{snapshot}" in value("general.tags")


def test_parity_json_records_every_check_and_quantization_try(exported):
    record = exported["parity"]
    names = {c["name"] for c in record["checks"]}
    assert record["passed"] and record["quantization"]["requested"] == "auto"
    attempts = record["quantization"]["attempts"]
    assert [a["qtype"] for a in attempts] == list(ladder("auto")[: len(attempts)])
    assert attempts[-1]["passed"] and attempts[-1]["qtype"] == record["quant"] == exported["version"].quant
    assert {"tokenization", "chat_template", "served_prompt", "logits_cosine"} <= names
    q = record["quant"]
    assert {f"{q}_loads", f"{q}_top1_agreement", f"{q}_kl_divergence", f"{q}_answer_recall"} <= names
    assert read_json(exported["run"].meta)["export"]["parity_passed"] is True


def test_adapter_written_as_gguf_lora_matching_the_merged_model(exported):
    record = exported["parity"]
    adapter = exported["run"].gguf / record["adapter"]
    keys, tensors = gguf_summary(adapter)
    assert keys["general.type"] == "adapter" and keys["adapter.type"] == "lora"
    assert any(name.endswith(".lora_a") for name in tensors)
    checks = {c["name"]: c for c in record["checks"]}
    assert checks["adapter_loads"]["passed"] and checks["adapter_logits_cosine"]["passed"]
    assert checks["adapter_logits_cosine"]["value"] >= parity.MIN_ADAPTER_COSINE


def test_cli_export_flags():
    args = build_parser().parse_args(["export", "run-1", "--adapter", "--quant", "auto"])
    assert args.adapter and args.quant == "auto"
    assert ExportSection().quant == "auto"
    with pytest.raises(ValueError):
        ExportSection(quant="Q3_K_S")


# --- choosing the quantization -----------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(exported) -> tuple[Path, parity.Probes, Any]:
    run = exported["run"]
    probe = parity.probes(load_tokenizer(run.merged))
    f16 = run.gguf / F16_NAME
    return f16, probe, probe.ask(f16)


def judge_with(reference, thresholds):
    _, probe, f16_run = reference
    return lambda q, path: parity.check_quantized(f16_run, probe.ask(path, vocab=False), q, probe, thresholds)


def test_falls_back_while_the_smaller_type_misses_its_thresholds(reference, tmp_path: Path):
    strict = {**parity.QUANT_THRESHOLDS, "Q4_K_M": IMPOSSIBLE}
    attempts = choose(reference[0], tmp_path, "auto", judge_with(reference, strict))
    assert [(a.qtype, a.passed) for a in attempts] == [("Q4_K_M", False), ("Q5_K_M", True)]
    assert "Q4_K_M_top1_agreement" in attempts[0].reason and attempts[0].bytes > 0
    assert not (tmp_path / "model-Q4_K_M.gguf").exists() and (tmp_path / "model-Q5_K_M.gguf").exists()


def test_forced_type_is_the_only_try_and_can_fail(reference, tmp_path: Path):
    strict = {**parity.QUANT_THRESHOLDS, "Q8_0": IMPOSSIBLE}
    attempts = choose(reference[0], tmp_path, "Q8_0", judge_with(reference, strict))
    assert [(a.qtype, a.passed) for a in attempts] == [("Q8_0", False)]
    assert (tmp_path / "model-Q8_0.gguf").exists()  # kept for inspection; the gate fails on it


# --- corrupt files never reach the registry ----------------------------------------------------


def corrupt(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "truncated_by_one_byte":
        data = data[:-1]
    elif how == "bad_magic":
        data[0] ^= 0xFF
    elif how == "absurd_tensor_count":
        data[8:16] = struct.pack("<Q", 1 << 40)
    elif how == "absurd_kv_count":
        data[16:24] = struct.pack("<Q", 1 << 40)
    elif how == "bad_value_type":  # the first key's value type, right after its name
        (key_len,) = struct.unpack_from("<Q", data, 24)
        data[32 + key_len : 36 + key_len] = struct.pack("<I", 99)
    dst.write_bytes(bytes(data))
    return dst


CORRUPTIONS = {
    "truncated": "runs past the end|cannot read|cannot load",
    "truncated_by_one_byte": "runs past the end|cannot read|cannot load",
    "bad_magic": "bad magic",
    "absurd_tensor_count": "claims 1099511627776 tensors",
    "absurd_kv_count": "claims 1099511627776 metadata keys",
    "bad_value_type": "gguf-py cannot read it",
}


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_gguf_is_refused_and_never_registered(exported, how: str, tmp_path: Path):
    home = exported["home"]
    current = registry.current(home)
    bad = corrupt(registry.gguf_path(home, current), tmp_path / "candidate.gguf", how)
    reason = llamacpp_child.problem(bad)
    assert reason is not None and __import__("re").search(CORRUPTIONS[how], reason), reason
    with pytest.raises(RegistryError, match="not registering"):
        registry.add(home, "v9", bad, {}, check=llamacpp_child.problem)
    assert not home.model("v9").exists() and registry.current(home) == current


def test_old_model_keeps_serving_after_a_corrupt_candidate(exported, tmp_path: Path):
    home = exported["home"]
    current = registry.current(home)
    server = Server(home, load(home.config), port=free_port()).start()
    try:
        bad = corrupt(registry.gguf_path(home, current), tmp_path / "candidate.gguf", "truncated")
        with pytest.raises(RegistryError):
            registry.add(home, "v9", bad, {}, check=llamacpp_child.problem)
        key = home.api_key.read_text().strip()
        reply = httpx.post(
            server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["model"] == current
        assert llamacpp_child.problem(registry.gguf_path(home, current)) is None
    finally:
        server.stop()
    assert json.loads((home.model(current) / "version.json").read_text())["version"] == current
