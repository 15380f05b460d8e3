"""The ``appliance`` command: argument parsing, console output, ``init`` and ``demo``."""

from appliance.cli.command import main

__all__ = ["main"]
