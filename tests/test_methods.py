"""Training methods: each ends in weights llama.cpp serves (merged, converted, parity
passed); full fine-tuning is refused when it would not fit; unmergeable methods are
refused with the reason; ``auto`` says what it chose and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_settings

from appliance.contract.api import open_engine
from appliance.contract.errors import ConfigError, ExportError, TrainError
from appliance.home.config import load
from appliance.home.fsutil import read_json
from appliance.home.paths import Home
from appliance.training import methods


@pytest.mark.parametrize("method", ["prefix-tuning", "prompt", "bottleneck"])
def test_unmergeable_methods_are_refused_with_the_reason(method: str, tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'[train]\nmethod = "{method}"\n')
    with pytest.raises(ConfigError) as err:
        load(config)
    assert "llama.cpp" in str(err.value) and "\n" not in str(err.value).strip()


def test_unknown_method_lists_the_choices(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[train]\nmethod = "magic"\n')
    with pytest.raises(ConfigError, match="auto, qlora, lora, dora, adalora, ia3, full"):
        load(config)


def test_parameters_counted_from_headers(tiny_base: Path):
    from appliance.runtime.hf import load_causal_lm

    model = load_causal_lm(tiny_base)
    assert methods.count_parameters(tiny_base) == sum(p.numel() for p in model.parameters())


def test_full_fine_tuning_refused_over_budget(tiny_base: Path):
    need = methods.full_estimate(methods.count_parameters(tiny_base))
    with pytest.raises(TrainError, match="full fine-tuning .* needs about .* GiB and the budget is"):
        methods.choose("full", tiny_base, 100, need - 1)
    assert methods.choose("full", tiny_base, 100, need).method == "full"


def test_auto_picks_by_data_size_and_memory_and_says_why(tiny_base: Path):
    params = methods.count_parameters(tiny_base)
    roomy = methods.full_estimate(params) * 4
    assert methods.choose("auto", tiny_base, 10_000, roomy).method == "full"
    small_data = methods.choose("auto", tiny_base, 300, roomy)
    assert small_data.method == "lora" and "300 examples" in small_data.reason
    tight = methods.choose("auto", tiny_base, 10_000, methods.lora_estimate(params))
    assert tight.method == "qlora" and "4-bit" in tight.reason


def train_and_export(home: Home, method: str) -> tuple[dict, dict]:
    settings = tiny_settings()
    settings.train.method = method
    (home.config).write_text((home.config).read_text().replace('method = "qlora"', f'method = "{method}"'))
    assert load(home.config).train.method == method
    engine = open_engine(home.root)
    engine.ingest()
    run = engine.train(max_steps=2)
    engine.export(run, quant="F16")
    return read_json(home.run(run).root / "train.json"), read_json(home.run(run).parity)


@pytest.mark.parametrize(
    "method",
    [pytest.param(m, marks=pytest.mark.slow) if m != "ia3" else m for m in ("lora", "dora", "adalora", "ia3", "full")],
)
def test_method_trains_merges_converts_and_passes_parity(method: str, tiny_home: Home):
    info, parity = train_and_export(tiny_home, method)
    assert info["method"] == method and info["steps"] == 2
    assert parity["passed"], parity
    kind = methods.adapter_kind(tiny_home.run(info["run"]).adapter)
    assert kind == {"lora": "LORA", "dora": "DORA", "adalora": "ADALORA", "ia3": "IA3", "full": "full"}[method]


def test_only_plain_lora_becomes_a_gguf_adapter(tmp_path: Path):
    from appliance.export.convert import convert_lora

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ExportError, match="IA3 adapter cannot be served as a llama.cpp LoRA"):
        convert_lora(tmp_path, adapter, tmp_path / "out.gguf")


def test_engine_sets_the_method_with_the_config_checks(tiny_home: Home):
    from appliance.home import audit

    engine = open_engine(tiny_home.root)
    assert engine.set_method("ia3") == "ia3" and load(tiny_home.config).train.method == "ia3"
    with pytest.raises(ConfigError, match="prefix tuning adds learned key/value vectors"):
        engine.set_method("prefix-tuning")
    assert load(tiny_home.config).train.method == "ia3"  # a refused choice changes nothing
    entry = audit.find(tiny_home, "configure")[-1]
    assert entry["details"]["value"] == "ia3" and entry["details"]["before"] == "qlora"
