"""The ``appliance`` command (``command.py``), its console output, ``init`` and ``demo``."""
