"""``python -m appliance``: the same command as ``appliance``."""

from .cli import main

raise SystemExit(main())
