"""Stage 10, serve: the OpenAI-compatible endpoint (architecture.md, "The endpoint").

Two parts. The front (this package, Starlette on uvicorn) is the only thing clients
reach: bearer key (constant time), Host/Origin refusal, request limits, model ids,
one log line per request. Generation runs in native llama.cpp ``llama-server``
processes on private Unix sockets (appliance/runtime/llama_server.py says why: native speed,
and llama-server's own CORS/Host handling is not safe to expose). The front proxies
over a keep-alive httpx pool per backend, passing the backend's JSON or SSE bytes
through: each backend runs with ``--alias <model id>``, so the ``model`` field already
names what answered (only an adapter host's replies get their ``model`` rewritten).

Backends. A backend is started for a *spec* (:class:`resolve.Spec`): a merged model (the shared
collection's versions ``base``/``vN``, or a collection configured ``serve = "merged"``),
or the *adapter host*: the base model once, with every collection's current LoRA adapter
loaded beside it (``--lora`` each, at scale 0). A request for ``appliance/<collection>``
goes to the host with ``"lora": [{"id": i, "scale": 1.0}]`` for that collection's adapter:
switching adapters between requests costs no model load (llama.cpp applies them per
slot; slots with different adapters are simply not batched together). A collection
version that is not current (``appliance/<c>@vN``) gets a small host of its own.

Hot swap. The control channel is the ``current`` symlinks themselves (no extra socket):
model ids are resolved with a readlink per request, and a watcher thread polls the links
(every 0.25 s) to start what a promotion or rollback needs as soon as it lands: the
shared collection's new version, or a new adapter host with the changed adapter list.
New requests wait for the new backend to report ready (they are never sent to a
half-loaded model), except that a collection whose adapter did not change keeps using
the running host meanwhile; requests in flight finish on the backend they hold, and an
old backend is stopped only once its last request is done (a superseded adapter host
as soon as its successor is ready; otherwise at most ``serve.keep_loaded`` backends,
least recently used retired first). A backend that fails to start is not switched to:
requests for the collection's current model keep going to what last answered for it,
with a warning in the log, and only a request nothing can serve gets a 503. The daemon
may also call :meth:`server.Server.prepare` before promoting, so the switch costs no wait.

Access. Every ``/v1`` request carries a key (appliance/home/keys.py); a model id of a
collection the key may not see is answered exactly like an id that does not exist, and
``/v1/models`` lists only what the key sees. Each request's log line names the key; use
is summed per (key, model) and written to the audit log as ``key_use`` entries every
``serve.audit_flush_seconds`` and at stop: counts, token counts and times, never text.

The rooms, each importable on its own (nothing is imported here, so that importing one
room does not load the others):

- ``guard``: the ASGI middleware that checks Host, Origin and the bearer key; bind checks.
- ``openai``: what a request may ask (validation) and the body forwarded to llama-server.
- ``schemas``: client JSON schemas (response_format, tool parameters) bounded before llama.cpp sees them.
- ``tools``: tool calls for a model whose chat template has none (instructions, a schema, the answer read back).
- ``resolve``: a model id and a key to what serves it (specs, adapters, the adapter host).
- ``pool``: the running backends: started on demand, least recently used retired, slots.
- ``relay``: a backend's reply passed through to the client, streamed or not.
- ``usage``: per-key use, summed and written to the audit log.
- ``app``: the Starlette routes (chat, completions, embeddings, models); ``server``: uvicorn in a
  thread, start and stop.

Every room logs as ``appliance.serve`` (operators filter the endpoint's lines by that name).
"""
