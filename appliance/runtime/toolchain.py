"""Where llama.cpp's own conversion tools live on this machine.

The installed llama-cpp-python wheel carries no converter; its sdist does
(gguf-conversion.md). Setup (packaging/setup.sh) unpacks the converter files from
the sdist of the pinned version into ``<prefix>/share/appliance/llama.cpp-<version>``
so that converter and runtime come from one llama.cpp commit. Nothing is fetched at
run time.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from appliance.contract.errors import ToolchainError

PINNED = "0.3.36"
FETCH_HINT = (
    "run: bash packaging/fetch_converter.sh (it needs the package registry once; offline bundles carry the files)"
)


def llama_cpp_version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise ToolchainError("llama-cpp-python is not installed; run: bash packaging/setup.sh") from None


def candidates() -> list[Path]:
    """APPLIANCE_LLAMA_CPP_DIR alone when set (an operator's explicit choice), else the defaults."""
    if env := os.environ.get("APPLIANCE_LLAMA_CPP_DIR"):
        return [Path(env)]
    ver = llama_cpp_version()
    found = []
    found.append(Path(sys.prefix) / "share" / "appliance" / f"llama.cpp-{ver}")
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    found.append(Path(cache) / "appliance" / f"llama.cpp-{ver}")
    return found


def llama_cpp_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py, conversion/, gguf-py/ and models/."""
    for folder in candidates():
        if (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf").is_dir():
            return folder
    looked = ", ".join(str(p) for p in candidates())
    raise ToolchainError(f"llama.cpp converter not found (looked in {looked}); {FETCH_HINT}")


def converter_env() -> dict[str, str]:
    """Environment for the converter subprocess: its own gguf-py first on the path,
    never the PyPI gguf this process uses (they differ despite the same version)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(llama_cpp_dir() / "gguf-py"), env.get("PYTHONPATH")]))
    env.pop("NO_LOCAL_GGUF", None)  # the converter then puts its own gguf-py ahead of site-packages
    return env
