"""The private fine-tuning appliance: the headless engine.

Importing this package makes the process offline for the Hugging Face stack
before any of it is imported: the appliance never talks to a model hub.
"""

import os

__version__ = "0.1.0"

# Set before transformers/huggingface_hub are imported anywhere in the process:
# they read these at import time. setdefault would let a stray "0" in the
# environment switch the hub back on, so these are forced.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_IMPLICIT_TOKEN"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The appliance draws its own progress; the libraries' bars and advisories are noise
# to the people reading its output (set these to override while debugging).
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
