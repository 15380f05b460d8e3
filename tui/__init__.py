"""The Textual terminal app (issue 8).

``tui.app.make_app(engine)`` builds it for any ``appliance.contract.api.Engine``: the real one
(``appliance tui``), or a test's scripted one. ``tui.client`` is the only place that
calls the engine; it imports nothing of the engine but ``appliance.contract.api``,
``appliance.contract.events`` and ``appliance.contract.errors`` (tests/test_boundaries.py).
"""
