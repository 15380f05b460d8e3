"""Typed settings: ``config.toml`` in the home, overridden by ``APPLIANCE_*`` variables.

Unknown keys are rejected, so a typo in config.toml is an error rather than a
setting that silently does nothing. Nested keys in the environment use ``__``:
``APPLIANCE_SERVE__PORT=8090``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from appliance.contract.errors import ConfigError

# Training methods: every one ends in plain weights llama.cpp can serve (appliance/training/methods.py).
METHODS = ("qlora", "lora", "dora", "adalora", "ia3", "full")
# Refused with the reason a person needs (the method validator turns these into one-line errors).
UNMERGEABLE = {
    "prefix": "prefix tuning adds learned key/value vectors at run time; they cannot be folded into plain "
    "weights, and llama.cpp serves plain weights only",
    "prompt": "prompt tuning adds learned input embeddings at run time; llama.cpp cannot serve them",
    "p-tuning": "p-tuning adds a prompt encoder at run time; llama.cpp cannot serve it",
    "bottleneck": "bottleneck adapters add new layers between the model's own; they cannot be merged into its "
    "weights, and llama.cpp serves plain weights only",
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseSection(Section):
    name: str = Field("smollm2-135m-instruct", description="Folder under base/ holding the HF checkpoint.")


class DataSection(Section):
    val_fraction: float = Field(
        0.1, ge=0.0, lt=0.5, description="Share of records held out for validation, chosen by hash."
    )
    max_tokens: int = Field(1024, ge=32, description="Longest training example in tokens.")
    too_long: Literal["truncate", "reject"] = Field(
        "reject",
        description="A chat example longer than max_tokens: reject it at ingest (reported by line) or keep "
        "it and cut it to max_tokens at training time.",
    )
    chunk_tokens: int = Field(
        512, ge=16, description="Document chunk length in base-model tokens (capped a little below max_tokens)."
    )
    chunk_overlap: int = Field(64, ge=0, description="Tokens consecutive document chunks share (at most half a chunk).")
    csv_prompt_columns: list[str] = Field(
        ["prompt", "question", "instruction", "input"],
        description="CSV header names tried in order (any case) for the prompt.",
    )
    csv_response_columns: list[str] = Field(
        ["response", "answer", "output", "completion"],
        description="CSV header names tried in order (any case) for the answer.",
    )
    max_line_bytes: int = Field(
        1_000_000, ge=1024, description="Longest line of a .jsonl or .csv file; a longer line is skipped and reported."
    )
    max_file_bytes: int = Field(
        100_000_000,
        ge=1024,
        description="Largest file read whole (.json, .txt, .md, .pdf, .docx); a larger one is quarantined.",
    )


class WatchSection(Section):
    quiet_seconds: float = Field(
        2.0, gt=0, description="A file counts once its size and mtime have not changed for this long."
    )
    open_grace_seconds: float = Field(
        60.0,
        gt=0,
        description="Where close-after-write is reported (Linux inotify): "
        "how long a file still open for writing is waited for "
        "before the quiet rule alone decides.",
    )
    rescan_seconds: float = Field(
        300.0, gt=0, description="Full rescan of the inbox at this interval (and at start) to reconcile missed events."
    )
    polling: bool = Field(
        False,
        description="List the folder periodically instead of using inotify: for network "
        "file systems (NFS, SMB), where change events do not arrive.",
    )
    poll_seconds: float = Field(1.0, gt=0, description="With polling: how often the folder is listed.")


class TrainSection(Section):
    method: str = Field(
        "qlora",
        description="qlora: LoRA on an NF4 4-bit base; lora, dora, adalora, ia3: peft "
        "adapters on the bf16 base; full: every weight (small bases); auto: "
        "chosen by data size and free memory.",
    )
    memory_budget_gb: float | None = Field(
        None,
        gt=0,
        description="Memory a run may use; default 90% of the GPU, else the RAM available when the run starts.",
    )
    dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA) instead of plain LoRA.")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapter's input; off by default: "
        "it slows CPU training by about a quarter and "
        "does not help a few passes over small data.",
    )
    target_modules: Literal["all-linear", "qv"] = "all-linear"
    learning_rate: float | None = Field(
        None,
        gt=0,
        description="Peak learning rate; default by the base's size: "
        "1e-3 under 1B parameters, 4e-4 under 4B, 2e-4 above "
        "(LoRA wants about ten times a full fine-tune's rate).",
    )
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    epochs: float | None = Field(
        None,
        gt=0,
        description="Passes over the data; default 2 to 8 by the number of "
        "examples (fewer examples, more passes), raised up to "
        "max_epochs when the data would make fewer than min_steps "
        "updates.",
    )
    min_steps: int = Field(
        60,
        ge=1,
        description="Fewest optimizer updates a run makes when epochs and "
        "tokens_per_step are not set: small data gets smaller steps (down "
        "to 256 tokens) and then more passes, since facts are learned from "
        "many updates, not from a few large ones.",
    )
    max_epochs: float = Field(12, gt=0, description="Most passes the min_steps rule may choose.")
    max_steps: int | None = Field(None, ge=1)
    tokens_per_step: int | None = Field(
        None,
        ge=64,
        description="Packed tokens per optimizer step (padding-free); default 1024, fewer for small data (min_steps).",
    )
    micro_tokens: int | None = Field(
        None, ge=32, description="Tokens per forward pass; default 256 on CPU, 4096 on CUDA."
    )
    eval_every: int | None = Field(None, ge=1, description="Validation every N steps; default about once an epoch.")
    patience: int | None = Field(
        3, ge=1, description="Stop after this many validations without improvement; unset to never stop early."
    )
    checkpoint_every: int = Field(20, ge=1, description="Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1)
    general_mix: float = Field(
        0.2,
        ge=0.0,
        le=0.5,
        description="Share of general-purpose material mixed into training to limit forgetting: everyday "
        "conversations and, in equal number, paragraphs of plain prose (appliance/data/general/). "
        "Without it, the handbook's study material (lr 1e-3, 3 passes) made the 135M default's "
        "perplexity on general text 2.3x and its general answers fall from 53% to 40%; with "
        "conversations alone, perplexity still rose 1.34x: the gate refused both runs, and people "
        "saw nothing learned.",
    )
    seed: int = 1234
    threads: int | None = Field(
        None, ge=1, description="CPU threads for torch; default: all cores (shared out among the processes)."
    )
    processes: Literal["auto"] | int = Field(
        "auto",
        description="Training processes (data parallel, one per GPU): auto uses every visible GPU and one "
        "process without a GPU; N > 1 starts N processes through torchrun, each on its share of every "
        "step's examples, with the same effective batch and learning-rate schedule as one process.",
    )
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How several processes train: ddp, a full copy of the model per process and the "
        "step's gradients summed across them (gloo on CPUs, nccl on GPUs); fsdp, each process holds a "
        "shard of the model and gathers a layer's weights only while it runs (FSDP2; QLoRA's 4-bit "
        "weights stored in bf16 so they shard), for a base too large for one device (lora and qlora "
        "only); auto, ddp when the method's memory estimate fits one device's budget, else fsdp.",
    )
    max_restarts: int = Field(
        2,
        ge=0,
        description="Times a multi-process run is restarted from its last checkpoint when one process "
        "dies (killed, out of memory) before the job fails.",
    )
    incremental: bool = Field(
        True,
        description="A run continues the current version's adapter on the new records plus a replay "
        "sample of earlier ones, so learning costs what changed; a full run from the base happens "
        "when it must (training/incremental.py says when).",
    )
    replay_ratio: float = Field(
        1.0, ge=0.0, description="Earlier records replayed per new record in an incremental run (against forgetting)."
    )
    replay_min: int = Field(
        32, ge=0, description="Fewest earlier records an incremental run replays (when there are that many)."
    )
    max_chain: int = Field(
        5, ge=1, description="Incremental runs in a row before a full run from the base consolidates them."
    )
    consolidate: Literal["daily", "weekly", "never"] = Field(
        "weekly",
        description="A full run from the base at least this often (the next run after the period "
        "is a full one), so small drifts of incremental runs never accumulate for long.",
    )

    @field_validator("method")
    @classmethod
    def _mergeable(cls, value: str) -> str:
        key = value.strip().lower()
        for name, why in UNMERGEABLE.items():
            if key.startswith(name):
                raise ValueError(f"{value!r} is not offered: {why}")
        if key not in (*METHODS, "auto"):
            raise ValueError(f"unknown method {value!r}; choose one of auto, {', '.join(METHODS)}")
        return key


class StudySection(Section):
    enabled: bool = Field(
        True,
        description="Turn every document (text, Markdown, PDF, Word) into question-and-"
        "answer conversations covering each fact it states, plus re-told "
        "passages, and train on them with the document's own text.",
    )
    organisation: str | None = Field(
        None,
        description="The organisation's name, used in some study questions "
        '("What does Ridgeline\'s handbook say ...") and never '
        "taken for a fact; unset: questions name no organisation.",
    )
    passage_tokens: int = Field(
        256,
        ge=32,
        description="Longest passage (base-model tokens) a document is cut into before its statements are extracted.",
    )
    teacher: str = Field(
        "auto",
        description='Who writes extra questions per fact beside the model-free generators: "auto" the '
        "home's current merged model (else the base), a path to a local instruct .gguf (e.g. an 8B), "
        'or "off". Its questions are kept only when they read as questions about the fact.',
    )
    teacher_questions: int = Field(3, ge=0, le=10, description="Questions the teacher is asked for per fact.")
    teacher_min_gb: float = Field(
        1.0,
        ge=0.0,
        description='"auto" takes the home\'s model as teacher only when its file is at least this size (about '
        "a 2B model at 4 bits): the 135M default wrote questions its facts do not answer "
        "(\"What's the new staff member's name?\" for the orientation time).",
    )
    raft: bool = Field(
        True,
        description="Also train, per fact, questions asked with the passages the endpoint would "
        "retrieve for them (the answering one among them) and an answer that cites it [n], so the "
        "served model uses and cites its sources (RAFT).",
    )
    raft_questions: int = Field(
        2,
        ge=1,
        le=10,
        description="Study questions per fact asked that way, each with what retrieval finds for it. "
        "On the team's handbook, 2 instead of 1 raised 'says the documents do not say' on questions "
        "they do not answer from 0.30 to 0.65 and closed-book recall from 0.11 to 0.18 (open-book "
        "0.23 to 0.18), for 29% more training steps.",
    )
    raft_swap_share: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Share of the cited answers made counterfactual: the digits of one key value of "
        "the fact (a number, time, date, extension, room) changed in its passage and its answer alike, so that only "
        "reading the passage gives the answer. Without them the model answers from what it "
        "memorised and cites the passage beside a wrong value (data/study/raft.py). On the team's "
        "handbook, 0.5 raised open-book recall of the gate's held-out questions from 0.60 to 0.83 "
        "and of the paraphrased probes from 0.18 to 0.26.",
    )
    raft_shuffle: bool = Field(
        False,
        description="Put the passages of each cited training answer in a random order instead of "
        "retrieval's (where the answering passage is [1] nine times in ten), so that the model must "
        "find it rather than answer from [1]. Off: on the team's handbook the 135M default, "
        "trained shuffled, cited [2] (the commonest place in its training) whatever the passages, "
        "and citation accuracy fell from 0.60 to 0.24; a larger base may learn to cite by place.",
    )
    raft_none_share: float = Field(
        0.2,
        ge=0.0,
        le=0.9,
        description="Share of those questions asked with the answering passage left out, answered "
        '"The documents do not say.", so the model says so rather than inventing.',
    )
    raft_unanswerable_share: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        description="Questions the documents do not answer, as a share of the facts, answered "
        "\"The documents do not say.\": one statement's subject with another statement's predicate "
        "that no statement pairs with it (data/study/unanswerable.py).",
    )
    raft_memory_share: float = Field(
        0.0,
        ge=0.0,
        le=0.9,
        description="Share of those questions asked with the answering passage left out and answered all "
        "the same, uncited (RAFT's own recipe, for bases large enough to know what they know). Off: at "
        "0.2 the 135M default said so on 10% of unanswerable questions and invented the rest.",
    )
    seed: int = Field(
        0,
        description="Chooses question wordings and which phrasing of each fact is held out for "
        "the gate; the same seed gives the same study material.",
    )


class ExportSection(Section):
    quant: Literal["auto", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"] = Field(
        "auto",
        description="auto: the smallest of Q4_K_M, Q5_K_M, Q6_K, Q8_0 that keeps quality against f16; "
        "or force one type.",
    )
    min_logit_cosine: float = Field(0.9999, gt=0, le=1, description="llama.cpp f16 logits against the HF model.")
    recall_examples: int = Field(32, ge=0, description="Validation answers whose recall a quantized file must keep.")


class ServeSection(Section):
    host: str = "127.0.0.1"
    port: int = Field(8088, ge=1, le=65535)
    threads: int | None = Field(None, ge=1)
    context: int = Field(2048, ge=256)
    max_tokens_limit: int = Field(
        2048,
        ge=1,
        description="Largest max_tokens a request may ask for; also how far "
        "an answer may run when a request sets none (to the "
        "end of the context at most).",
    )
    max_choices: int = Field(4, ge=1, le=16, description="Largest n (answers generated for one request).")
    max_prompt_bytes: int = Field(1_000_000, ge=1024)
    slots: int = Field(4, ge=1, le=64, description="Requests one model answers at once (llama-server --parallel).")
    max_concurrent: int = Field(64, ge=1, description="Requests the endpoint holds at once; more get 429.")
    keep_loaded: int = Field(2, ge=1, le=8, description="Model versions kept loaded (current + recently used).")
    replicas: Literal["auto"] | int = Field(
        "auto",
        description="llama-server processes per loaded model, each with its own slots: auto is one per "
        "visible GPU (one without a GPU); requests go to the replica with the fewest in flight, a "
        "promotion switches once every replica of the new version answers, and a replica that dies "
        "is restarted while the others answer. On a CPU, threads are shared out among replicas.",
    )
    audit_flush_seconds: float = Field(
        60.0,
        gt=0,
        description="How often the endpoint writes which key used which model (counts and times) to the audit log.",
    )


class GroundingSection(Section):
    mode: Literal["auto", "off"] = Field(
        "auto",
        description="auto: answers to the 'appliance' and 'appliance/<collection>' model ids are grounded in "
        "the collection's documents (retrieved passages in the prompt, returned as 'sources') whenever "
        "the collection holds documents; off: the model alone. A collection may set its own.",
    )
    passages: int = Field(
        3,
        ge=1,
        le=10,
        description="Passages put in the prompt (the best by BM25, fused with vectors); each is a sentence.",
    )
    min_score: float = Field(
        0.0,
        ge=0.0,
        description="A passage scoring at most this (BM25, higher is better) is left out; 0: any passage "
        "sharing a word with the question may be used, and the model says when they do not answer it.",
    )
    query_turns: int = Field(
        2,
        ge=1,
        le=8,
        description="User turns the retrieval query is made of: the last, and the ones before it as context.",
    )
    embedding_model: str | None = Field(
        None,
        description="Path of an embedding GGUF served at /v1/embeddings "
        "(llama.cpp in embedding mode) and used for hybrid retrieval: the question's nearest "
        "passages fused with BM25's by reciprocal rank, so questions in other words find their "
        "passage; unset: no embeddings, BM25 alone. Choose a retrieval model (an embedding "
        "GGUF such as a BGE or nomic-embed one): a chat model's averaged states retrieve poorly "
        "(the 135M default's: recall@3 0.45 on the handbook, against BM25's 0.74, passages of "
        "three sentences).",
    )
    word_vectors: bool = Field(
        True,
        description="Where no embedding_model is set, hybrid retrieval with the word vectors shipped "
        "with the appliance (WordLlama, 256 dimensions, no download): they link words BM25 cannot "
        "(ID card and badge). On the team's handbook the answering sentence is among the 3 retrieved "
        "for 0.80 of paraphrased probes, fused with BM25, against 0.65 for BM25 alone.",
    )


class GateSection(Section):
    bootstrap_samples: int = Field(
        1000,
        ge=100,
        description="Resamples for the interval on the validation loss difference (candidate minus current).",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Two-sided level of that interval.")
    loss_margin: float = Field(
        0.0,
        ge=0.0,
        description="Extra validation-loss (nats per token) a candidate may "
        "lose beyond the bootstrap interval's lower end.",
    )
    require_better_on_new: bool = Field(
        True,
        description="A training run must be better than the current model "
        "on validation examples from data it never saw.",
    )
    max_examples: int = Field(64, ge=4, description="Validation examples scored per model (the first by hash).")
    general_max_drop: float = Field(
        0.1, ge=0.0, le=1.0, description="Largest fall in the share of general probes answered with an expected phrase."
    )
    general_max_ppl_ratio: float = Field(
        1.25, ge=1.0, description="Largest candidate/current perplexity ratio on the general text."
    )
    user_max_drop: float = Field(
        0.0, ge=0.0, le=1.0, description="Largest fall in the share of the home's probes/ questions answered correctly."
    )
    probe_tokens: int = Field(48, ge=4, description="Tokens generated per probe answer.")
    promotion: Literal["auto", "review"] = Field(
        "auto",
        description="auto: a candidate that passes the gate is promoted at once; review: it waits for "
        "people to compare its answers with the current model's and approve it "
        "('appliance review', the TUI's Review screen).",
    )
    approvals: int = Field(
        1,
        ge=1,
        description="With promotion = review: approvals (from different OS users) "
        "a candidate needs before it is promoted; one rejection refuses it.",
    )
    review_questions: int = Field(
        10, ge=1, description="Questions in a review (validation conversations, else the home's probes)."
    )
    review_tokens: int = Field(128, ge=4, description="Tokens generated per answer shown to reviewers (greedy).")
    open_book_questions: int = Field(
        40,
        ge=0,
        description="Of those, how many are also asked with the passages the endpoint would retrieve "
        "(open-book recall and citation accuracy, reported beside closed-book recall).",
    )
    recall_questions: int = Field(
        160,
        ge=0,
        description="Held-out study questions (never trained) asked of each "
        "model per gate, chosen evenly across documents and facts; "
        "0 turns the closed-book recall check off.",
    )
    recall_max_drop: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Largest share of the held-out questions the "
        "current model answers that the candidate may "
        "stop answering.",
    )
    require_recall_gain: bool = Field(
        True,
        description="When new documents arrived, a training run must answer "
        "more of their held-out questions than the current model.",
    )


class DaemonSection(Section):
    poll_seconds: float = Field(
        1.0,
        gt=0,
        description="How often the daemon checks the journal for commands "
        "(retrain, forget, pause) from other processes.",
    )
    keep_versions: int = Field(
        5, ge=2, description="Model versions kept; older ones are deleted, never the current or the previous one."
    )
    retrain_after_ingest: bool = Field(True, description="Queue a training run when new records arrive.")


class DiskSection(Section):
    min_free_gb: float = Field(
        2.0, ge=0.0, description="A stage does not start with less free space than this in the home's file system."
    )


class CollectionSection(Section):
    serve: Literal["adapter", "merged"] = Field(
        "adapter",
        description="adapter: the collection's model is a LoRA adapter served on the one loaded base "
        "model (no extra model in memory); merged: its own merged, quantized model (for "
        "methods without a plain LoRA, or an owner who prefers it).",
    )
    grounding: Literal["auto", "off"] | None = Field(
        None, description="This collection's grounding mode; unset: [grounding] mode."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APPLIANCE_", env_nested_delimiter="__", extra="ignore")

    base: BaseSection = BaseSection()
    data: DataSection = DataSection()
    watch: WatchSection = WatchSection()
    train: TrainSection = TrainSection()
    study: StudySection = StudySection()
    export: ExportSection = ExportSection()
    serve: ServeSection = ServeSection()
    grounding: GroundingSection = GroundingSection()
    gate: GateSection = GateSection()
    daemon: DaemonSection = DaemonSection()
    disk: DiskSection = DiskSection()
    # per collection, by name: [collections."legal/matter-17"] serve = "merged"
    collections: dict[str, CollectionSection] = {}

    def collection(self, name: str) -> CollectionSection:
        return self.collections.get(name) or CollectionSection()

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
    return validated(data, path)


def validated(data: dict[str, Any], source: Path | str) -> Settings:
    """Settings from plain data, with the first problem as one line naming ``source``."""
    try:
        return Settings(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: {where}: {first['msg']}") from None


def dump(settings: Settings) -> str:
    return tomli_w.dumps(settings.model_dump(exclude_none=True))
