"""``python -m appliance``: the same command as ``appliance``."""

from appliance.cli.command import main

raise SystemExit(main())
