"""Incremental training (issue 20) on the tiny model: a run continues the current version's
adapter on what is new plus a replay sample; a full run from the base happens when it must.

The gate here is made lenient (no "better on new data" requirement, wide loss margin), so
that what is tested is which path a run takes and what it starts from, not whether a
6-step run on a random model learns enough to be promoted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_daemon import daemon_settings, make_template

from appliance.data.ingest import ingest
from appliance.data.snapshot import cut
from appliance.engine.forget import forget
from appliance.engine.pipeline import Context, run_job
from appliance.home import registry
from appliance.home.config import Settings, dump, load
from appliance.home.fsutil import read_json
from appliance.home.journal import Journal
from appliance.home.paths import Home
from appliance.training import incremental


def lenient(**train: object) -> Settings:
    s = daemon_settings(**train)
    s.gate.require_better_on_new = False
    s.gate.require_recall_gain = False
    s.gate.loss_margin = 100.0
    s.gate.general_max_drop = 1.0
    s.gate.general_max_ppl_ratio = 100.0
    s.gate.user_max_drop = 1.0
    s.gate.recall_max_drop = 1.0
    s.study.enabled = False
    s.train.replay_min = 4
    return s


def chats(home: Home, name: str, facts: list[tuple[str, str]]) -> Path:
    """A chat file with one conversation per (question, answer), in the inbox."""
    path = home.inbox / name
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        for q, a in facts
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def facts(prefix: str, n: int = 12) -> list[tuple[str, str]]:
    return [
        (f"What is the {prefix} code number {i}?", f"The {prefix} code number {i} is {prefix[:3]}-{i:03d}.")
        for i in range(n)
    ]


def one_job(home: Home, kind: str = "train") -> dict:
    with Journal(home.jobs_db) as journal:
        journal.enqueue(kind, reason="test")
        job = run_job(Context(home, journal, load(home.config)), journal.next_job())
    assert job.state in ("done", "refused"), job.error
    info = read_json(home.run(job.run_id).train_json)
    return {"job": job, "train": info, "plan": info["incremental"]}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Home:
    settings = lenient()
    home = make_template(tmp_path_factory.mktemp("incremental") / "home", tiny_base, settings)
    home.config.write_text(dump(settings))
    return home


@pytest.fixture()
def home(template: Home, tmp_path: Path) -> Home:
    dest = tmp_path / "home"
    shutil.copytree(template.root, dest, symlinks=True)
    return Home(dest)


def test_the_next_run_continues_the_current_adapter(home: Home):
    chats(home, "ward-a.jsonl", facts("alpha"))
    ingest(home)
    first = one_job(home)
    assert first["plan"]["mode"] == "full" and first["plan"]["reason"] == "no trained version to continue"
    assert first["job"].state == "done"
    v1 = registry.current(home)

    chats(home, "ward-b.jsonl", facts("bravo", 6))
    ingest(home)
    snap = cut(home, load(home.config).data.val_fraction)
    how = incremental.plan(home, snap, load(home.config))
    assert how.incremental and how.parent == v1 and how.chain == 1
    assert how.new and set(how.new) <= set(snap.train)
    old = set(snap.train) - set(how.new)
    assert how.replay and set(how.replay) <= old  # replay only from earlier records
    # the sample is deterministic for a seed, and moves along the chain
    assert incremental.replay_sample(home, sorted(old), len(how.new), load(home.config), 1) == how.replay
    assert incremental.replay_sample(home, sorted(old), len(how.new), load(home.config), 2) != how.replay

    # step 0 of the incremental run is the parent's adapter, exactly
    from appliance.training.train import _adapter_weights, _load_trained_state, _trained_state, load_trainable

    settings = load(home.config)
    parent = registry.get(home, v1)["run"]
    model = load_trainable(home.base("tiny"), settings, "cpu", read_json(home.run(parent).train_json)["method"])
    saved = _adapter_weights(home.run(parent).adapter)
    _load_trained_state(model, saved)
    state = _trained_state(model)
    assert set(state) == set(saved)
    assert all(torch.equal(state[k].float(), saved[k].float()) for k in saved)

    second = one_job(home)
    assert second["plan"]["mode"] == "incremental" and second["plan"]["parent"] == v1
    assert second["train"]["train_examples"] < 12 + 6  # new + replay, not everything
    lineage = registry.lineage(home, registry.current(home))
    if second["job"].state == "done":
        assert lineage["parent"] == v1 and lineage["training"]["incremental"]["chain"] == 1


def test_consolidation_fires_when_it_must(home: Home):
    chats(home, "ward-a.jsonl", facts("alpha"))
    ingest(home)
    one_job(home)
    settings = load(home.config)
    chats(home, "ward-b.jsonl", facts("bravo", 4))
    ingest(home)
    snap = cut(home, settings.data.val_fraction)
    assert incremental.plan(home, snap, settings).incremental

    # the job asks for it
    assert "forget" in incremental.plan(home, snap, settings, kind="forget").reason
    assert "consolidation" in incremental.plan(home, snap, settings, kind="consolidate").reason
    # the shape of the adapter changed
    wider = settings.model_copy(deep=True)
    wider.train.lora_r = 32
    assert "train.lora_r" in incremental.plan(home, snap, wider).reason
    # turned off
    off = settings.model_copy(deep=True)
    off.train.incremental = False
    assert not incremental.plan(home, snap, off).incremental
    # the schedule: a week after the last full run
    week = incremental.plan(home, snap, settings, now=read_json(_current_train_json(home))["finished_at"] + 8 * 86_400)
    assert not week.incremental and "weekly" in week.reason
    # the chain length
    short = settings.model_copy(deep=True)
    short.train.max_chain = 1
    info = read_json(_current_train_json(home))
    info["incremental"]["chain"] = 1
    _current_train_json(home).write_text(json.dumps(info))
    assert "max_chain" in incremental.plan(home, snap, short).reason
    info["incremental"]["chain"] = 0
    _current_train_json(home).write_text(json.dumps(info))
    # a missing adapter
    adapter = home.run(registry.get(home, registry.current(home))["run"]).adapter
    shutil.move(adapter, adapter.with_name("adapter.moved"))
    assert (
        "adapter" in incremental.plan(home, snap, settings).reason
        and not incremental.plan(home, snap, settings).incremental
    )
    shutil.move(adapter.with_name("adapter.moved"), adapter)
    # a document rewritten at the same path (records left the data)
    chats(home, "ward-a.jsonl", facts("alpha")[:-1] + [("What is the alpha code number 11?", "It is ALP-999.")])
    ingest(home)
    rewritten = incremental.plan(home, cut(home, settings.data.val_fraction), settings)
    assert not rewritten.incremental and "left the data" in rewritten.reason


def test_forget_runs_from_the_base(home: Home):
    chats(home, "ward-a.jsonl", facts("alpha"))
    chats(home, "ward-b.jsonl", facts("bravo", 6))
    ingest(home)
    one_job(home)
    forget(home, "ward-b.jsonl")
    with Journal(home.jobs_db) as journal:
        job = run_job(Context(home, journal, load(home.config)), journal.next_job())
    plan = read_json(home.run(job.run_id).train_json)["incremental"]
    assert job.kind == "forget" and plan["mode"] == "full"


def test_a_refused_incremental_run_queues_one_consolidation(home: Home):
    chats(home, "ward-a.jsonl", facts("alpha"))
    ingest(home)
    one_job(home)
    strict = load(home.config)
    strict.gate.loss_margin = 0.0
    strict.gate.require_better_on_new = True  # and a run with a learning rate that wrecks the adapter
    strict.train.learning_rate = 0.5
    home.config.write_text(dump(strict))
    chats(home, "ward-b.jsonl", facts("bravo", 6))
    ingest(home)
    result = one_job(home)
    assert result["plan"]["mode"] == "incremental"
    assert result["job"].state == "refused"
    with Journal(home.jobs_db) as journal:
        queued = [j for j in journal.queue() if j.kind == "consolidate"]
    assert len(queued) == 1 and result["job"].run_id in queued[0].reason


def _current_train_json(home: Home) -> Path:
    return home.run(registry.get(home, registry.current(home))["run"]).train_json


def test_a_resumed_run_keeps_its_plan_and_replay_sample(home: Home):
    from appliance.training.train import _plan

    chats(home, "ward-a.jsonl", facts("alpha"))
    ingest(home)
    one_job(home)
    chats(home, "ward-b.jsonl", facts("bravo", 6))
    ingest(home)
    settings = load(home.config)
    snap = cut(home, settings.data.val_fraction)
    run = home.run("run-resume")
    run.root.mkdir(parents=True)
    first = _plan(home, run, snap, settings, "train", lambda e: None)
    other = settings.model_copy(deep=True)
    other.train.replay_ratio = 3.0  # would pick another sample if planned again
    again = _plan(home, run, snap, other, "train", lambda e: None)
    assert first.incremental and again == first


@pytest.mark.slow
def test_three_incremental_promotions_then_a_consolidation(home: Home):
    settings = load(home.config)
    settings.train.max_chain = 3
    home.config.write_text(dump(settings))
    chats(home, "ward-0.jsonl", facts("zero"))
    ingest(home)
    modes = [one_job(home)["plan"]["mode"]]
    for i in range(1, 5):
        chats(home, f"ward-{i}.jsonl", facts(f"ward{i}", 4))
        ingest(home)
        result = one_job(home)
        assert result["job"].state == "done", result["job"].error
        modes.append(result["plan"]["mode"])
    assert modes == ["full", "incremental", "incremental", "incremental", "full"]
    lineage = registry.lineage(home, registry.current(home))
    assert lineage["training"]["incremental"]["reason"].startswith("3 incremental runs")
