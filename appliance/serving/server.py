"""The endpoint as one object: uvicorn serving the app, the backend pool and the key-use
flusher, started and stopped together."""

from __future__ import annotations

import logging
import threading
import time

from appliance.contract.errors import ServeError
from appliance.home import catalog, registry
from appliance.home.config import Settings
from appliance.home.keys import KeyStore
from appliance.home.paths import Home
from appliance.serving.app import make_app
from appliance.serving.guard import check_bind, read_api_key
from appliance.serving.pool import START_TIMEOUT, BackendPool
from appliance.serving.resolve import ALIAS
from appliance.serving.usage import KeyUse

log = logging.getLogger("appliance.serve")


class Server:
    """The endpoint: uvicorn in a background thread (demo, tests, daemon) or ``serve_forever``
    (the CLI). Stopping it stops every llama-server it started and writes the key-use audit."""

    def __init__(self, home: Home, settings: Settings, host: str | None = None, port: int | None = None):
        import uvicorn

        home = home.top
        self.host = host or settings.serve.host
        self.port = port or settings.serve.port
        check_bind(self.host, self.port, settings)
        read_api_key(home)  # an initialised home has its admin key; a missing or empty one is one clear line
        keys = KeyStore(home)
        keys.list()  # migrates a home made before keys.json, and finds an unreadable one now
        self.pool = BackendPool(home, settings)
        self.usage = KeyUse(home)
        self.flush_seconds = settings.serve.audit_flush_seconds
        app = make_app(home, settings, keys, self.pool, self.usage)
        config = uvicorn.Config(
            app, host=self.host, port=self.port, log_level="warning", access_log=False, timeout_graceful_shutdown=30
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._flusher: threading.Thread | None = None
        self.home = home

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, wait_model: float = START_TIMEOUT) -> Server:
        """Listen, and wait (up to ``wait_model`` s) for the current models' backends to load (the
        shared version and the adapter host); one that will not load is logged and answered
        with 503, the endpoint still starts."""
        self._begin()
        self._thread = threading.Thread(target=self._server.run, name="appliance-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                self._end()
                raise ServeError(f"the endpoint did not start on {self.url}")
            time.sleep(0.05)
        for current in (
            lambda: self.pool.target(ALIAS).spec if registry.current(self.home) else None,
            self.pool.refresh_host,
        ):
            try:
                if (spec := current()) is not None:
                    self.pool.ensure(spec).result(timeout=wait_model)
            except Exception as exc:  # noqa: BLE001  (logged by the pool; the endpoint answers 503 for it)
                log.error("a current model is not being served: %s", exc)
        return self

    def prepare(self, version: str, timeout: float = START_TIMEOUT, collection: str = catalog.SHARED) -> None:
        """Load what serving ``collection``'s ``version`` needs ahead of its promotion; raises
        ServeError if it cannot serve."""
        self.pool.prepare(version, timeout, collection)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread:
            self._thread.join(timeout=40)
        self._end()

    def serve_forever(self) -> None:
        self._begin()
        try:
            self._server.run()
        finally:
            self._end()

    def _begin(self) -> None:
        self.pool.start()
        self._flusher = threading.Thread(target=self._flush_every, name="appliance-key-use", daemon=True)
        self._flusher.start()

    def _end(self) -> None:
        self._stopping.set()
        if self._flusher is not None:
            self._flusher.join(timeout=10)
        self.pool.close()
        self.usage.flush()  # after the last request ended: nothing counted is lost

    def _flush_every(self) -> None:
        while not self._stopping.wait(self.flush_seconds):
            self.usage.flush()
