#!/usr/bin/env python3
"""Turn the distributions installed in a Python environment back into wheels.

Run it with the interpreter whose packages you want (``VENV/bin/python repack_installed.py
--out DIR``). build_bundle.sh uses it for ``--wheels-from``: a bundle built from exactly
what is installed and tested here, with no registry at all (the offline install test uses
this; a production bundle downloads or builds its wheels instead).

A pip install keeps each file a wheel carried and lists it in ``*.dist-info/RECORD``, so
the wheel can be rebuilt from that: files under site-packages go back to their place;
files outside it (``../../../bin/x``, ``../../../share/...``) go back under
``<name>.data/scripts`` or ``<name>.data/data``; console scripts pip generated from
``entry_points.txt`` are left out (pip generates them again), and so are the installer's
own marks (INSTALLER, REQUESTED, direct_url.json) and byte-code caches. Editable
installs (a project under development) are skipped: build those with ``pip wheel``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import sys
import zipfile
from importlib.metadata import Distribution, distributions
from pathlib import Path

INSTALLER_MARKS = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def is_editable(dist: Distribution) -> bool:
    text = dist.read_text("direct_url.json") or ""
    return '"editable": true' in text.replace("'", '"')


def wheel_tag(dist: Distribution) -> str:
    """The compressed tag set of the WHEEL file, e.g. cp311-cp311-manylinux_2_28_x86_64."""
    tags = [
        line.split(":", 1)[1].strip()
        for line in (dist.read_text("WHEEL") or "").splitlines()
        if line.startswith("Tag:")
    ]
    if not tags:
        raise ValueError(f"{dist.metadata['Name']}: no Tag in WHEEL; installed by something other than pip")
    parts = [t.split("-") for t in tags]
    return "-".join(".".join(dict.fromkeys(p[i] for p in parts)) for i in range(3))


def generated_scripts(dist: Distribution) -> set[str]:
    return {ep.name for ep in dist.entry_points if ep.group in ("console_scripts", "gui_scripts")}


def archive_name(dist: Distribution, rel: str, data_dir: str, prefix: Path) -> str | None:
    """Where an installed file goes inside the wheel; None to leave it out."""
    parts = Path(rel).parts
    if "__pycache__" in parts or rel.endswith(".pyc"):
        return None
    if parts[0].endswith(".dist-info") and parts[-1] in INSTALLER_MARKS:
        return None
    if parts[0] != "..":
        return Path(rel).as_posix()
    absolute = Path(dist.locate_file(rel)).resolve()
    inside = absolute.relative_to(prefix.resolve()).as_posix()
    if inside.startswith("bin/"):
        if absolute.name in generated_scripts(dist):
            return None
        return f"{data_dir}/scripts/{absolute.name}"
    return f"{data_dir}/data/{inside}"


def script_bytes(path: Path) -> bytes:
    """A script pip installed has its shebang rewritten to this interpreter; a wheel
    carries the placeholder '#!python', which pip rewrites again on the target."""
    data = path.read_bytes()
    if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
        return b"#!python" + data[data.index(b"\n") :]
    return data


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(dist: Distribution, out: Path, prefix: Path) -> Path:
    name, version = normalize(dist.metadata["Name"]), dist.version
    target = out / f"{name}-{version}-{wheel_tag(dist)}.whl"
    data_dir, info_dir = f"{name}-{version}.data", None
    records = []
    partial = target.with_suffix(".partial")
    # Level 1: the bulk is native libraries that compress little; speed matters on 2 cores.
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for entry in dist.files or []:
            arc = archive_name(dist, str(entry), data_dir, prefix)
            if arc is None:
                continue
            path = Path(dist.locate_file(entry))
            if not path.is_file():
                raise ValueError(f"{dist.metadata['Name']}: {entry} is in RECORD but missing on disk")
            data = script_bytes(path) if arc.startswith(f"{data_dir}/scripts/") else path.read_bytes()
            zf.writestr(arc, data)
            records.append(record_line(arc, data))
            if arc.split("/", 1)[0].endswith(".dist-info"):
                info_dir = arc.split("/", 1)[0]
        if info_dir is None:
            raise ValueError(f"{dist.metadata['Name']}: no .dist-info in RECORD")
        records.append(f"{info_dir}/RECORD,,")
        zf.writestr(f"{info_dir}/RECORD", "\n".join(records) + "\n")
    partial.rename(target)
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the wheels")
    parser.add_argument("--exclude", action="append", default=[], help="distribution name to leave out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = Path(sys.prefix)
    excluded = {normalize(n) for n in args.exclude} | {"pip"}
    seen: set[str] = set()
    for dist in sorted(distributions(), key=lambda d: normalize(d.metadata["Name"])):
        name = normalize(dist.metadata["Name"])
        if name in excluded or name in seen or is_editable(dist):
            continue
        seen.add(name)  # the first on sys.path wins, as for import
        wheel = repack(dist, args.out, prefix)
        print(f"repacked {wheel.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
