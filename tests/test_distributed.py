"""Training on several processes (issue 21): torchrun's ranks over gloo on these CPUs, the tiny model.

Two processes must train exactly what one does (same steps, same effective batch, the
step's gradients summed): the per-step losses match; a rank killed with SIGKILL makes
torchrun restart the ranks from rank 0's last checkpoint and the run finishes with no
process left over; a run stopped on two processes resumes on one."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from appliance.contract.errors import TrainError
from appliance.contract.events import Event, Message, Progress
from appliance.data.ingest import ingest
from appliance.data.snapshot import Snapshot, cut
from appliance.home.config import Settings, load
from appliance.home.fsutil import read_json
from appliance.home.paths import Home
from appliance.training.distributed import Group
from appliance.training.launch import launch
from appliance.training.methods import choose_distributed
from appliance.training.render import Example
from appliance.training.train import TrainInterrupted, train

STEPS = 6


def ready(home: Home, **train_settings: object) -> tuple[Snapshot, Settings]:
    """The clinic conversations ingested and cut into a snapshot; the run's settings."""
    ingest(home)
    settings = load(home.config)
    settings.study.enabled = False
    settings.train.general_mix = 0.0
    settings.train.max_steps = STEPS
    settings.train.tokens_per_step = 512
    settings.train.micro_tokens = 256
    settings.train.eval_every = 3
    settings.train.patience = None
    for key, value in train_settings.items():
        setattr(settings.train, key, value)
    return cut(home, settings.data.val_fraction), settings


def losses(home: Home, run: str) -> list[float]:
    return [point["loss"] for point in read_json(home.run(run).train_json)["curve"]]


def rank_processes(home: Home, run: str) -> list[psutil.Process]:
    """The live torchrun ranks of ``run`` (their command line names the run's launch.json)."""
    spec = str(home.run(run).launch_json)
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if spec in cmdline and "appliance.training.rank" in cmdline:
            found.append(proc)
    return found


def test_shards_cover_every_example_once_and_balance_tokens():
    examples = [Example([1] * n, [1] * n) for n in (50, 40, 30, 30, 20, 10, 5)]
    shards = [Group(rank, 2).shard(examples) for rank in range(2)]
    assert sorted(id(e) for s in shards for e in s) == sorted(id(e) for e in examples)
    sizes = [sum(len(e.input_ids) for e in s) for s in shards]
    assert abs(sizes[0] - sizes[1]) <= 10, sizes
    assert Group(0, 3).shard(examples[:1]) and not Group(2, 3).shard(examples[:1])  # a rank may sit a step out


@pytest.mark.parametrize(
    ("method", "distributed"),
    [
        ("qlora", "ddp"),
        ("qlora", "fsdp"),
        pytest.param("lora", "ddp", marks=pytest.mark.slow),
        pytest.param("lora", "fsdp", marks=pytest.mark.slow),
    ],
)
def test_two_processes_train_what_one_does(tiny_home: Home, method: str, distributed: str):
    snap, settings = ready(tiny_home, method=method)
    train(tiny_home, snap, settings, run_id="one")
    settings.train.processes = 2
    settings.train.distributed = distributed  # type: ignore[assignment]
    events: list[Event] = []
    launch(tiny_home, snap.id, settings, "two", "train", events.append)

    one, two = losses(tiny_home, "one"), losses(tiny_home, "two")
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two, strict=True):
        assert b == pytest.approx(a, rel=0.02), (one, two)
    info_one, info_two = read_json(tiny_home.run("one").train_json), read_json(tiny_home.run("two").train_json)
    assert info_two["processes"] == 2 and info_one["processes"] == 1
    assert info_two["distributed"] == distributed and info_one["distributed"] is None
    assert info_two["best_val_loss"] == pytest.approx(info_one["best_val_loss"], rel=0.01)
    adapter_one = load_file(tiny_home.run("one").adapter / "adapter_model.safetensors")
    adapter_two = load_file(tiny_home.run("two").adapter / "adapter_model.safetensors")
    assert adapter_two.keys() == adapter_one.keys()  # sharded or not, the same full adapter is written
    for name, tensor in adapter_one.items():
        assert torch.allclose(adapter_two[name].float(), tensor.float(), atol=2e-3), name
    steps_seen = [e.completed for e in events if isinstance(e, Progress)]
    assert steps_seen == list(range(1, STEPS + 1))  # rank 0's events only, each step once
    assert not rank_processes(tiny_home, "two")


@pytest.mark.slow
def test_a_killed_rank_restarts_the_run_from_its_checkpoint(tiny_home: Home):
    snap, settings = ready(tiny_home, processes=2, max_steps=16, checkpoint_every=2, eval_every=8)
    checkpoints = tiny_home.run("two").checkpoints
    killed: list[int] = []

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if checkpoints.is_dir() and any(checkpoints.iterdir()):
                for proc in rank_processes(tiny_home, "two"):
                    if proc.environ().get("RANK") == "1":
                        proc.kill()
                        killed.append(proc.pid)
            time.sleep(0.2)

    killer = threading.Thread(target=kill_rank_1)
    killer.start()
    events: list[Event] = []
    launch(tiny_home, snap.id, settings, "two", "train", events.append)
    killer.join()

    assert killed, "the test never saw a checkpoint to kill a rank after"
    info = read_json(tiny_home.run("two").train_json)
    assert info["steps"] == 16 and info["resumed_from"] and info["resumed_from"][0] >= 2
    said = [e.text for e in events if isinstance(e, Message)]
    assert any("restarting all 2 from the last checkpoint" in text for text in said), said  # people see the restart
    assert any(text.startswith("resuming run two from step") for text in said), said
    assert not rank_processes(tiny_home, "two")


@pytest.mark.slow
def test_a_run_stopped_on_two_processes_resumes_on_one(tiny_home: Home):
    """Sharded on two (each rank holds half the adapter and its optimizer state), resumed whole
    on one: the checkpoint is the same full, name-keyed state either way."""
    snap, settings = ready(tiny_home, max_steps=8, checkpoint_every=2)
    train(tiny_home, snap, settings, run_id="one")
    settings.train.processes = 2
    settings.train.distributed = "fsdp"
    checkpoints = tiny_home.run("mixed").checkpoints

    def has_checkpoint() -> bool:
        return checkpoints.is_dir() and any(checkpoints.iterdir())

    with pytest.raises(TrainInterrupted):
        launch(tiny_home, snap.id, settings, "mixed", "train", lambda _: None, stop=has_checkpoint)
    assert not rank_processes(tiny_home, "mixed")
    settings.train.processes = 1
    train(tiny_home, snap, settings, run_id="mixed")

    info = read_json(tiny_home.run("mixed").train_json)
    assert info["processes_per_session"] == [2, 1] and info["resumed_from"]
    for a, b in zip(losses(tiny_home, "one"), losses(tiny_home, "mixed"), strict=True):
        assert b == pytest.approx(a, rel=0.02)


def test_auto_shards_only_what_does_not_fit_one_process():
    gib = 2**30
    params = 8 * 10**9  # an 8B base: about 6.3 GiB in 4 bits, 24 GiB in bf16 with LoRA's share
    assert choose_distributed("auto", "qlora", params, 24 * gib, 2)[0] == "ddp"
    layout, why = choose_distributed("auto", "qlora", params, 4 * gib, 2)
    assert layout == "fsdp" and "sharded over 2 processes" in why
    assert choose_distributed("auto", "lora", params, 16 * gib, 4)[0] == "fsdp"
    assert choose_distributed("auto", "full", params, 16 * gib, 4)[0] == "ddp"  # FSDP trains adapters only
    assert choose_distributed("fsdp", "qlora", params, 80 * gib, 2) == ("fsdp", "set in config")


def test_fsdp_refuses_a_method_it_does_not_shard(tiny_home: Home):
    snap, settings = ready(tiny_home, processes=2, distributed="fsdp", method="ia3", max_restarts=0)
    with pytest.raises(TrainError, match=r"distributed = 'fsdp' trains lora and qlora; .* ia3"):
        launch(tiny_home, snap.id, settings, "ia3", "train", lambda _: None)
    assert not rank_processes(tiny_home, "ia3")


@pytest.mark.slow
def test_a_killed_worker_leaves_no_rank_running(tiny_home: Home):
    """The process that launched the ranks dies by SIGKILL (no cleanup runs): torchrun and the
    ranks follow it within seconds instead of training on in their own session."""
    snap, settings = ready(tiny_home, processes=2, max_steps=200)
    script = (
        "import sys; from pathlib import Path; from appliance.home.config import Settings; "
        "from appliance.home.paths import Home; "
        "from appliance.training.launch import launch; "
        f"launch(Home(Path(sys.argv[1])), {snap.id!r}, Settings.model_validate_json(sys.argv[2]), 'orphan', 'train', "
        "lambda _: None)"
    )
    worker = subprocess.Popen([sys.executable, "-c", script, str(tiny_home.root), settings.model_dump_json()])
    deadline = time.monotonic() + 120
    while len(rank_processes(tiny_home, "orphan")) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(rank_processes(tiny_home, "orphan")) == 3, "torchrun and its two ranks never started"
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 30
    while rank_processes(tiny_home, "orphan") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not rank_processes(tiny_home, "orphan")


def test_a_failing_rank_is_one_clear_error(tiny_home: Home):
    snap, settings = ready(tiny_home, processes=2, max_restarts=0)
    base = tiny_home.base(settings.base.name)
    (base / "model.safetensors").write_bytes(b"not a model")  # every rank fails to load the base
    with pytest.raises(TrainError, match=r"training on 2 processes failed .*cannot load the model.*ranks.log"):
        launch(tiny_home, snap.id, settings, "broken", "train", lambda _: None)
    assert not rank_processes(tiny_home, "broken")
