"""The backend pool's policy with a fake backend factory (plain objects, no processes, no
llama.cpp): least recently used retirement within ``serve.keep_loaded``, no backend stopped
while a request holds it, slot choice by adapter, and a failed start never switched to.

The home is real (registry records, ``current`` links, collections), only the model files
are a few bytes: the pool checks their sha256 against the registry as it does for real ones.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from conftest import tiny_settings

from appliance.cli.init import create_home
from appliance.contract.errors import ServeError
from appliance.home import registry
from appliance.home.paths import Home
from appliance.serving.openai import forward_body
from appliance.serving.pool import BackendPool
from appliance.serving.resolve import Answering, Spec

CARDIO, LEGAL = "cardiology", "legal"


class FakeBackend:
    """What the pool reads and writes on a backend, with no process behind it."""

    def __init__(self, spec: Spec, slots: int):
        self.version = spec.name
        self.loras = tuple(a.path for a in spec.adapters)
        self.proc = None
        self.inflight = 0
        self.retired = False
        self.spec: object = None
        self.slot_busy = [False] * slots
        self.slot_lora: list[int | None] = [None] * slots
        self.slot_used = [0.0] * slots
        self.stopped = threading.Event()

    def alive(self) -> bool:
        return not self.stopped.is_set()

    def stop(self) -> None:
        self.stopped.set()


class FakeFactory:
    """Starts a FakeBackend per spec; the names in ``broken`` fail as a model that will not load."""

    def __init__(self, slots: int):
        self.slots = slots
        self.started: list[str] = []
        self.broken: set[str] = set()

    def __call__(self, spec: Spec, replica: int = 0) -> FakeBackend:
        self.started.append(spec.name)
        if spec.name in self.broken or f"{spec.name}#{replica}" in self.broken:
            raise ServeError(f"llama-server for {spec.name} exited (code 1) while loading {spec.gguf}")
        return FakeBackend(spec, self.slots)


def model_file(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_bytes(f"not a real model: {name}".encode())
    return path


@pytest.fixture()
def home(tmp_path: Path) -> Home:
    """The shared collection with base and v1..v3 (base current), and two adapter collections."""
    home = create_home(tmp_path / "home", "tiny", tiny_settings())
    registry.add(home, "base", model_file(tmp_path, "base.gguf"), {"quant": "F16"})
    for version in ("v1", "v2", "v3"):
        registry.add(home, version, model_file(tmp_path, f"{version}.gguf"), {"quant": "F16"})
    registry.promote(home, "base")
    base_sha = registry.get(home, "base")["sha256"]
    for collection in (CARDIO, LEGAL):
        scope = home.scoped(collection)
        registry.add(
            scope,
            "v1",
            model_file(tmp_path, f"{collection}.gguf"),
            {"kind": "adapter", "base_version": "base", "collection": collection, "base_sha256": base_sha},
            name=registry.ADAPTER_FILE,
        )
        registry.promote(scope, "v1")
    return home


@pytest.fixture()
def pools(home: Home):
    made: list[BackendPool] = []

    def make(keep: int = 2, slots: int = 3, replicas: int = 1) -> tuple[BackendPool, FakeFactory]:
        settings = tiny_settings()
        settings.serve.keep_loaded, settings.serve.slots, settings.serve.replicas = keep, slots, replicas
        factory = FakeFactory(slots)
        made.append(BackendPool(home, settings, start_backend=factory))
        return made[-1], factory

    yield make
    for pool in made:
        pool.close()


def acquire(pool: BackendPool, model: str) -> Answering:
    return asyncio.run(pool.acquire(model))


def use(pool: BackendPool, model: str) -> FakeBackend:
    """One request, answered and released."""
    answering = acquire(pool, model)
    pool.release(answering.backend, answering.slot)
    return answering.backend


def wait_stopped(backend: FakeBackend) -> None:
    assert backend.stopped.wait(2), f"{backend.version} was not stopped"


def test_the_least_recently_used_backend_is_retired_and_the_current_one_kept(pools):
    pool, factory = pools(keep=2)
    v1, v2 = use(pool, "v1"), use(pool, "v2")
    use(pool, "v1")  # v1 used again: v2 is now the least recently used
    assert pool.loaded() == ["v2", "v1"]
    use(pool, "v3")
    wait_stopped(v2)
    assert pool.loaded() == ["v1", "v3"] and v1.alive()
    # the current model ("appliance" is base) is never retired, however long unused
    base = use(pool, "appliance")
    use(pool, "v2")
    assert pool.loaded() == ["base", "v2"] and base.alive()
    use(pool, "v1")
    assert pool.loaded() == ["base", "v1"] and base.alive()
    assert factory.started == ["v1", "v2", "v3", "base", "v2", "v1"]


def test_a_backend_with_a_request_in_flight_stops_only_when_released(pools):
    pool, _ = pools(keep=1)
    held = acquire(pool, "v1")
    use(pool, "v2")  # v1 is over the limit: no new requests go to it, but it keeps answering
    assert pool.loaded() == ["v2"] and held.backend.retired
    time.sleep(0.1)
    assert held.backend.alive() and held.backend.inflight == 1
    pool.release(held.backend, held.slot)
    wait_stopped(held.backend)
    # a later request for v1 gets a backend of its own
    again = use(pool, "v1")
    assert again is not held.backend and again.alive()


def test_adapter_requests_go_to_a_slot_that_last_ran_their_adapter(pools):
    pool, factory = pools(slots=3)
    cardio = acquire(pool, f"appliance/{CARDIO}")
    host = cardio.backend
    assert host.loras and len(host.loras) == 2 and factory.started == [host.version]
    assert (cardio.model, cardio.lora, cardio.slot) == (f"appliance/{CARDIO}@v1", 0, 0)
    pool.release(host, cardio.slot)
    legal = acquire(pool, f"appliance/{LEGAL}")
    assert legal.backend is host and (legal.lora, legal.slot) == (1, 1)  # a fresh slot, not cardio's
    pool.release(host, legal.slot)
    assert acquire(pool, f"appliance/{CARDIO}").slot == 0  # cardio's slot again (its cache)
    assert acquire(pool, f"appliance/{LEGAL}").slot == 1
    assert acquire(pool, f"appliance/{CARDIO}").slot == 2  # its own slot busy: the unused one
    assert acquire(pool, f"appliance/{LEGAL}").slot is None  # all busy: llama.cpp chooses
    assert host.inflight == 4 and host.slot_lora == [0, 1, 0]
    # the body llama-server gets names the adapter and the slot, and the host's alias
    sent = forward_body({"prompt": "Hi", "lora": [{"id": 0, "scale": 9}]}, False, legal, 64)
    assert sent["lora"] == [{"id": 1, "scale": 1.0}] and sent["id_slot"] == 1 and sent["model"] == host.version


def test_a_version_that_fails_to_start_is_not_switched_to(pools, home: Home):
    pool, factory = pools()
    registry.promote(home, "v1")
    assert acquire(pool, "appliance").model == "v1"
    factory.broken.add("v2")
    registry.promote(home, "v2")
    fallback = acquire(pool, "appliance")  # v2 will not load: what last answered keeps answering
    assert fallback.model == "v1" and fallback.backend.alive()
    pool.release(fallback.backend, fallback.slot)
    assert factory.started == ["v1", "v2"]
    with pytest.raises(ServeError, match="v2 could not be loaded"):
        acquire(pool, "v2")  # asked for by name: nothing else may answer for it
    assert factory.started == ["v1", "v2"]  # and not tried again at once
    assert pool.loaded() == ["v1"]


def test_a_start_that_fails_with_nothing_to_fall_back_to_is_an_error(pools, home: Home):
    pool, factory = pools()
    factory.broken.add("v1")
    registry.promote(home, "v1")
    with pytest.raises(ServeError, match="v1 could not be loaded"):
        acquire(pool, "appliance")
    assert pool.loaded() == []


# --- replicas (serve.replicas): several processes per loaded model


def test_requests_go_to_the_replica_with_the_fewest_in_flight(pools):
    pool, factory = pools(replicas=2)
    held = [acquire(pool, "v1") for _ in range(4)]
    assert factory.started == ["v1", "v1"]  # both replicas started before the first answer
    per_replica = {}
    for answering in held:
        per_replica[id(answering.backend)] = per_replica.get(id(answering.backend), 0) + 1
    assert sorted(per_replica.values()) == [2, 2]
    first = held[0].backend
    for answering in held:
        if answering.backend is first:
            pool.release(answering.backend, answering.slot)
    assert acquire(pool, "v1").backend is first  # the idle replica takes the next request


def test_a_dead_replica_is_restarted_while_the_other_answers(pools):
    pool, factory = pools(replicas=2)
    one = acquire(pool, "v1").backend
    other = acquire(pool, "v1").backend
    assert one is not other
    one.stop()  # killed
    answered = acquire(pool, "v1").backend
    assert answered is not one and answered.alive()  # never the dead one, and no wait for a restart
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(pool.backends("v1")) < 2:
        time.sleep(0.02)
    assert factory.started == ["v1", "v1", "v1"]  # only the dead replica was started again
    replicas = pool.backends("v1")
    assert len(replicas) == 2 and other in replicas and one not in replicas


def test_a_model_is_ready_only_when_every_replica_is(pools):
    pool, factory = pools(replicas=2)
    factory.broken.add("v2#1")
    with pytest.raises(ServeError, match="could not be loaded"):
        acquire(pool, "v2")
    assert "v2" not in pool.loaded()
    factory.broken.clear()
    pool._failed.clear()  # the retry delay, elapsed
    assert acquire(pool, "v2").backend.alive() and factory.started.count("v2") == 4
