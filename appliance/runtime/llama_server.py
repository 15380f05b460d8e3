"""Native llama-server backends: one private process per loaded model version, or per
*adapter host* (the base model with every collection's LoRA adapter, chosen per request).

Why native llama-server and not llama-cpp-python (measured, performance.md): the
llama-cpp-python server answers one request at a time (0.72x native single-stream,
0.33x with 4 clients); llama-server batches its slots in C++ and the appliance front
adds only the proxy hop. The binary is built from the pinned sdist (the same llama.cpp
commit as the converter and parity checks) by packaging/build_llama_server.sh.

Security (verified on the pinned llama.cpp 0c1e570, tools/server/server-http.cpp, and by
tests/test_serve.py against the built binary): llama-server never checks the ``Host``
header and, with its default CORS settings, answers ``Host: evil.example`` /
``Origin: http://evil.example`` with 200 and ``Access-Control-Allow-Origin:
http://evil.example`` (the request's Origin reflected). So a backend never listens on a TCP port: it binds a Unix socket
in a private 0700 folder, reachable only by this user, and every client goes through
the appliance front (appliance/serving/), which does the key, Host, Origin and limit checks and
passes on only the body and content type, never the backend's CORS headers.

Processes: each backend is its own session (no terminal signals), gets SIGKILL when the
thread that started it dies (PR_SET_PDEATHSIG; the launcher threads live as long as the
process) and is stopped by :func:`stop_all` at exit, so none outlives the appliance.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO

import httpx

from appliance.contract.errors import ServeError
from appliance.runtime.toolchain import llama_cpp_version

log = logging.getLogger("appliance.serve")
BUILD_HINT = "run: bash packaging/build_llama_server.sh .venv/bin/python"
PR_SET_PDEATHSIG = 1

# Backends are started from these long-lived threads: PR_SET_PDEATHSIG fires when the
# *thread* that forked the child exits, so short-lived worker threads must not start them.
LAUNCHER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="llama-server-launcher")
_LIVE: set[Backend] = set()
_LIVE_LOCK = threading.Lock()


def binary() -> Path:
    """The llama-server built for the pinned llama-cpp-python; one clear line when missing."""
    if env := os.environ.get("APPLIANCE_LLAMA_SERVER"):
        path = Path(env)
    else:
        path = Path(sys.prefix) / "share" / "appliance" / f"llama.cpp-{llama_cpp_version()}" / "bin" / "llama-server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise ServeError(f"native llama-server not found at {path}; {BUILD_HINT}")
    return path


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass  # not Linux/glibc: the atexit hook and process group still apply


class Backend:
    """One llama-server process serving one GGUF under one name (``--alias``): a model version,
    or, with ``loras``, an *adapter host*: the base model with LoRA adapters loaded at scale 0
    (``--lora-init-without-apply``), each request choosing its adapter by index with a
    ``"lora": [{"id": i, "scale": 1.0}]`` field (llama.cpp applies it per slot, no reload)."""

    def __init__(
        self,
        version: str,
        gguf: Path,
        *,
        slots: int,
        context: int,
        threads: int,
        log_path: Path | None = None,
        loras: tuple[Path, ...] = (),
    ):
        self.version = version
        self.gguf = gguf
        self.loras = loras
        self.slots = slots
        self.context = context
        self.threads = threads
        self.log_path = log_path
        self.folder = Path(tempfile.mkdtemp(prefix="appliance-"))  # 0700: only this user reaches the socket
        self.socket = self.folder / "llama.sock"
        self.proc: subprocess.Popen | None = None
        self.inflight = 0  # guarded by the owning pool's lock
        self.retired = False  # no new requests; stopped once inflight reaches 0
        self.spec: object = None  # what the owning pool started it for (serving.resolve.Spec)
        self.replica = 0  # which of the spec's replicas (serve.replicas) this process is
        # per slot, as the front sent requests (guarded by the pool's lock): busy, the adapter
        # it last ran, when; an adapter host's requests go to a slot that ran their adapter
        self.slot_busy = [False] * slots
        self.slot_lora: list[int | None] = [None] * slots
        self.slot_used = [0.0] * slots
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def command(self) -> list[str]:
        return [
            str(binary()),
            "--model",
            str(self.gguf),
            "--alias",
            self.version,
            "--host",
            str(self.socket),
            "--parallel",
            str(self.slots),
            # -c is the whole KV cache, split evenly over the slots: context per request = context
            "--ctx-size",
            str(self.context * self.slots),
            "--threads",
            str(self.threads),
            "--threads-batch",
            str(self.threads),
            # The GGUF's own chat template rendered by llama.cpp's Jinja engine, the same
            # template and tokens training used (tests/test_serve.py compares /apply-template
            # with the tokenizer's rendering); without --jinja llama.cpp guesses a built-in
            # format, which drops e.g. SmolLM2's default system prompt.
            "--jinja",
            "--n-gpu-layers",
            "999",  # all layers on the GPU when the build has CUDA; ignored on CPU
            "--no-webui",
            *self._lora_args(),
        ]

    def _lora_args(self) -> list[str]:
        if not self.loras:
            return []
        for path in self.loras:
            if "," in str(path):  # llama.cpp splits --lora values at commas
                raise ServeError(
                    f"{path}: llama-server cannot load an adapter whose path has a comma; "
                    "move the home to a path without one"
                )
        # loaded once, applied per request: without a "lora" field a request would get none
        return [arg for path in self.loras for arg in ("--lora", str(path))] + ["--lora-init-without-apply"]

    def start(self) -> None:
        """Spawn the process; does not wait for the model to load. Called on a LAUNCHER thread
        (start_async) so that the parent-death signal is tied to a thread that lives on."""
        out: IO[bytes] | int = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_set_pdeathsig,
                close_fds=True,
            )
        finally:
            if not isinstance(out, int):
                out.close()
        with _LIVE_LOCK:
            _LIVE.add(self)

    def wait_ready(self, timeout: float) -> None:
        """Block until GET /health is 200 (the model is loaded) or raise ServeError."""
        deadline = time.monotonic() + timeout
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://backend", timeout=2) as client:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    code = None if self.proc is None else self.proc.returncode
                    raise ServeError(
                        f"llama-server for {self.version} exited (code {code}) while loading "
                        f"{self.gguf}; see {self.log_path}"
                    )
                if self.socket.exists():
                    try:
                        if client.get("/health").status_code == 200:
                            return
                    except httpx.TransportError:
                        pass
                if time.monotonic() > deadline:
                    raise ServeError(f"llama-server for {self.version} was not ready within {timeout:.0f} s")
                time.sleep(0.05)

    def client(self) -> httpx.AsyncClient:
        """A keep-alive connection pool to this backend, bound to the calling event loop."""
        if self._client is None:
            self._loop = asyncio.get_running_loop()
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
            self._client = httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=str(self.socket), limits=limits),
                base_url="http://backend",
                timeout=httpx.Timeout(connect=10, read=900, write=60, pool=None),
            )
        return self._client

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        client, loop = self._client, self._loop
        self._client = None
        if client is not None and loop is not None and loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            except RuntimeError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        shutil.rmtree(self.folder, ignore_errors=True)
        with _LIVE_LOCK:
            _LIVE.discard(self)


def start_async(backend: Backend, timeout: float) -> Future[Backend]:
    """Start and wait for readiness on a launcher thread; the future fails with ServeError."""

    def run() -> Backend:
        try:
            backend.start()
            backend.wait_ready(timeout)
        except BaseException:
            backend.stop()
            raise
        return backend

    return LAUNCHER.submit(run)


@atexit.register
def stop_all() -> None:
    """Stop every backend this process started (the Server stops its own; this is the net)."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for backend in live:
        backend.stop()
