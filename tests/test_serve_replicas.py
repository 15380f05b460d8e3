"""Serving replicas (``[serve] replicas``, issue 21) with real llama-server processes: two per
loaded model behind the one front. A promotion under four client threads drops nothing and
switches once both replicas of the new version answer; a replica killed mid-run is
restarted while the other answers, and the requests it held fail with a clear error, never
a hang. (The balancing policy itself is tested with fake backends in test_serving_pool.py.)"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import free_port, tiny_settings

from appliance.cli.init import create_home, export_base
from appliance.home import registry
from appliance.home.config import load
from appliance.serving.guard import read_api_key
from appliance.serving.server import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    home = create_home(tmp_path_factory.mktemp("replicas") / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    settings = load(home.config)
    settings.serve.replicas, settings.serve.threads = 2, 1
    export_base(home, settings)
    registry.add(home, "v1", registry.gguf_path(home, "base"), {"quant": "same as base"})
    server = Server(home, settings, port=free_port()).start()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=read_api_key(home), max_retries=0, timeout=60)
    yield {"home": home, "server": server, "client": client}
    backends = server.pool.backends()
    server.stop()
    assert all(b.proc is None or b.proc.poll() is not None for b in backends), "a replica outlived stop()"


class Clients:
    """Four threads asking 'appliance' until stopped: the models that answered, and every failure."""

    def __init__(self, client: openai.OpenAI):
        self.client = client
        self.answers: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ask, args=(i % 2 == 1,)) for i in range(4)]

    def _ask(self, stream: bool) -> None:
        messages = [{"role": "user", "content": "Hi"}]
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                if stream:
                    chunks = list(
                        self.client.chat.completions.create(
                            model="appliance", max_tokens=6, stream=True, messages=messages
                        )
                    )
                    model = chunks[-1].model
                else:
                    model = self.client.chat.completions.create(
                        model="appliance", max_tokens=6, messages=messages
                    ).model
                self.answers.append((time.monotonic(), model))
            except Exception as exc:  # noqa: BLE001  (every failure is collected and judged by the test)
                self.errors.append((time.monotonic(), repr(exc)))
            self.slowest = max(self.slowest, time.monotonic() - sent)

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def wait_for(self, model: str, after: float, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not any(m == model and t > after for t, m in self.answers):
            assert time.monotonic() < deadline, f"{model} never answered"
            time.sleep(0.05)


def test_two_replicas_answer_and_a_promotion_drops_nothing(served):
    home, pool = served["home"], served["server"].pool
    registry.promote(home, "base")
    with Clients(served["client"]) as clients:
        clients.wait_for("base", 0)
        base = pool.backends("base")
        assert len(base) == 2 and len({b.proc.pid for b in base}) == 2
        switched = time.monotonic()
        registry.promote(home, "v1")
        clients.wait_for("v1", switched)
        assert len(pool.backends("v1")) == 2  # serving the new version means both of its replicas answer
        time.sleep(1.0)
    assert clients.errors == []
    assert len(clients.answers) > 10


def test_a_killed_replica_is_restarted_while_the_other_answers(served):
    home, pool = served["home"], served["server"].pool
    registry.promote(home, "v1")
    with Clients(served["client"]) as clients:
        clients.wait_for("v1", 0)
        victim = pool.backends("v1")[0]
        killed = time.monotonic()
        victim.proc.kill()
        clients.wait_for("v1", killed + 0.5)  # the live replica keeps answering
        deadline = time.monotonic() + 120
        while not (len(pool.backends("v1")) == 2 and victim not in pool.backends("v1")):
            assert time.monotonic() < deadline, "the killed replica was not restarted"
            time.sleep(0.1)
        back = time.monotonic()
        clients.wait_for("v1", back + 0.5)
    assert all(b.alive() for b in pool.backends("v1"))
    # the requests the dead replica held failed at once with a clear error (never a hang);
    # none failed once the replica was dropped
    assert all(t < back for t, _ in clients.errors), clients.errors
    assert all("not answering" in e or "stopped answering" in e or "503" in e for _, e in clients.errors), (
        clients.errors
    )
    assert clients.slowest < 60
