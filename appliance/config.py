"""Typed settings: ``config.toml`` in the home, overridden by ``APPLIANCE_*`` variables.

Unknown keys are rejected, so a typo in config.toml is an error rather than a
setting that silently does nothing. Nested keys in the environment use ``__``:
``APPLIANCE_SERVE__PORT=8090``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSection(Section):
    name: str = Field("smollm2-135m-instruct", description="Folder under base/ holding the HF checkpoint.")


class DataSection(Section):
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5, description="Share of records held out for validation, chosen by hash.")
    max_tokens: int = Field(1024, ge=32, description="Longest training example in tokens.")
    too_long: Literal["truncate", "reject"] = "reject"


class TrainSection(Section):
    method: Literal["qlora", "lora"] = "qlora"
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear", "qv"] = "all-linear"
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    epochs: float | None = Field(None, description="Passes over the data; default chosen from the data size.")
    max_steps: int | None = Field(None, ge=1)
    tokens_per_step: int = Field(2048, ge=64, description="Packed tokens per optimizer step (padding-free).")
    micro_tokens: int | None = Field(None, ge=32, description="Tokens per forward pass; default 256 on CPU, 4096 on CUDA.")
    seed: int = 1234
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: all cores.")


class ExportSection(Section):
    quant: Literal["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"] = "Q4_K_M"
    min_logit_cosine: float = 0.9999


class ServeSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(8088, ge=1, le=65535)
    threads: int | None = Field(None, ge=1)
    context: int = Field(2048, ge=256)
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for.")
    max_prompt_bytes: int = Field(1_000_000, ge=1024)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", env_nested_delimiter="__", extra="ignore")

    base: BaseSection = BaseSection()
    data: DataSection = DataSection()
    train: TrainSection = TrainSection()
    export: ExportSection = ExportSection()
    serve: ServeSection = ServeSection()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed in as init kwargs).
        return (env_settings, init_settings)


def load(path: Path) -> Settings:
    """Read and validate config.toml; one clear line on any problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config file; run 'appliance init' first") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = set(data) - set(Settings.model_fields)
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(sorted(unknown))}")
    try:
        return Settings(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: {where}: {first['msg']}") from None


def dump(settings: Settings) -> str:
    return tomli_w.dumps(settings.model_dump(exclude_none=True))
