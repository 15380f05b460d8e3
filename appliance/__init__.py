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
