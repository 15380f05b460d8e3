"""Backends as the endpoint runs them: native llama-server processes, one per spec.

The pool (pool.py) decides which backends run; this module only starts one. It is the
pool's default backend factory, so the pool's policy can be tested with a fake factory and
no processes (tests/test_serving_pool.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from appliance.contract.errors import ServeError
from appliance.home.config import Settings
from appliance.home.paths import Home
from appliance.runtime import llama_server
from appliance.runtime.llama_server import Backend
from appliance.serving.resolve import Spec

log = logging.getLogger("appliance.serve")
START_TIMEOUT = 300.0  # seconds for a backend to load its model

# Starts replica ``replica`` of a spec's backends and returns it once it answers; raises
# ServeError or OSError, having stopped whatever it started, when it cannot.
BackendFactory = Callable[[Spec, int], Backend]


def visible_gpus() -> int:
    """GPUs this process may use, without importing torch: CUDA_VISIBLE_DEVICES when set,
    else the NVIDIA device files."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return len([d for d in named.split(",") if d.strip() and d.strip() != "-1"])
    return len([d for d in Path("/dev").glob("nvidia[0-9]*")])


def replica_count(settings: Settings) -> int:
    """llama-server processes per loaded model: ``[serve] replicas``, auto = one per GPU."""
    wanted = settings.serve.replicas
    return max(1, visible_gpus()) if wanted == "auto" else int(wanted)


EMBEDDING = "appliance-embedding"  # the embedding model's id (and its backend's alias)


class ServedBackend(Backend):
    """A llama-server as the endpoint runs it: knowing whether its chat template takes tools
    (else the front handles them, appliance/serving/tools.py), and for the embedding model
    configured in ``[grounding]``, in embedding mode."""

    native_tools = True

    def __init__(self, *args: Any, embedding: bool = False, device: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.embedding = embedding
        self.device = device

    def command(self) -> list[str]:
        command = super().command()
        if self.device:  # one replica per GPU
            command += ["--device", self.device]
        if self.embedding:
            # an input is embedded in one batch: the batch must hold a whole context
            command += ["--embedding", "--batch-size", str(self.context), "--ubatch-size", str(self.context)]
            if not _declares_pooling(self.gguf):  # a chat model used for embeddings: average its tokens
                command += ["--pooling", "mean"]
        return command

    def read_caps(self) -> None:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://backend", timeout=10) as client:
            caps = client.get("/props").json().get("chat_template_caps") or {}
        self.native_tools = bool(caps.get("supports_tool_calls"))


def _declares_pooling(gguf: Path) -> bool:
    from gguf import GGUFReader  # llama.cpp's own reader; only an embedding model's start needs it

    try:
        return any(name.endswith(".pooling_type") for name in GGUFReader(gguf).fields)
    except (OSError, ValueError) as exc:
        raise ServeError(f"{gguf}: not a readable GGUF file ({exc})") from None


class LlamaServers:
    """The real backend factory: a native llama-server process per spec."""

    def __init__(self, home: Home, settings: Settings):
        self.binary = llama_server.binary()  # a missing build is one clear line, before anything listens
        self.logs = home.top.logs
        self.serve = settings.serve
        self.replicas = replica_count(settings)
        self.gpus = visible_gpus()
        # on a CPU the replicas share the cores; on GPUs each has its own device
        cores = len(os.sched_getaffinity(0))
        self.threads = settings.serve.threads or max(1, cores // (1 if self.gpus else self.replicas))
        log.info(
            "serving through native llama-server %s (%d replica(s) of %d slots, %d threads, context %d per slot)",
            self.binary,
            self.replicas,
            self.serve.slots,
            self.threads,
            self.serve.context,
        )

    def __call__(self, spec: Spec, replica: int = 0) -> Backend:
        suffix = f"-r{replica}" if replica else ""
        backend = ServedBackend(
            spec.name,
            spec.gguf,
            slots=self.serve.slots,
            context=self.serve.context,
            threads=self.threads,
            log_path=self.logs / f"llama-server-{spec.name.replace('/', '_')}{suffix}.log",
            loras=tuple(a.path for a in spec.adapters),
            embedding=spec.embedding,
            device=f"CUDA{replica % self.gpus}" if self.gpus > 1 else None,
        )
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            backend.start()
            backend.wait_ready(START_TIMEOUT)
            if not spec.embedding:
                backend.read_caps()
        except (ServeError, OSError, httpx.HTTPError, ValueError):
            backend.stop()
            raise
        return backend
