"""The Textual terminal app.

``tui.app.make_app(engine)`` builds it for any ``appliance.contract.api.Engine``: the real one
(``appliance tui``), or a test's scripted one. ``tui.client`` is the only place that calls the
engine, ``tui.board`` holds what the window knows and its wording, ``tui.endpoint`` talks to the
endpoint over HTTP; screens reach the app through ``tui.host.Host``. Of the appliance the TUI
imports only the contract package (tests/test_boundaries.py).
"""
