#!/usr/bin/env python3
"""Write or check a bundle's MANIFEST.sha256 (standard library only: it runs on the
target before anything is installed).

  verify_manifest.py write  BUNDLE_DIR   -> BUNDLE_DIR/MANIFEST.sha256 for every file
  verify_manifest.py verify BUNDLE_DIR   -> exit 0, or 1 with one line per problem

The format is sha256sum's (``<hex>  <relative path>``), so ``sha256sum -c`` reads it too.
Verification is stricter than ``sha256sum -c``: a file that is in the bundle but not in
the manifest is refused as well, because pip would install an extra wheel it finds in
the wheelhouse. The manifest itself is vouched for by its own sha256, which the builder
prints and the IT team compares out of band (docs/install.md).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path, PurePosixPath

MANIFEST = "MANIFEST.sha256"
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every regular file under root (relative, POSIX), the manifest itself excluded."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        if path.is_symlink():
            raise ValueError(f"{rel}: a symbolic link; a bundle holds plain files only")
        if path.is_file():
            found.append(rel)
    return found


def write(root: Path) -> Path:
    lines = [f"{sha256_file(root / rel)}  {rel}\n" for rel in bundle_files(root)]
    out = root / MANIFEST
    out.write_text("".join(lines), encoding="utf-8")
    return out


def read_manifest(root: Path) -> tuple[dict[str, str], list[str]]:
    """(path -> sha256, problems). Malformed or escaping lines are problems, never skipped."""
    entries: dict[str, str] = {}
    problems: list[str] = []
    text = (root / MANIFEST).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        pure = PurePosixPath(rel)
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            problems.append(f"{MANIFEST} line {number}: not '<sha256>  <path>'")
        elif pure.is_absolute() or ".." in pure.parts or not rel:
            problems.append(f"{MANIFEST} line {number}: path {rel!r} leaves the bundle")
        elif rel in entries:
            problems.append(f"{MANIFEST} line {number}: {rel} listed twice")
        else:
            entries[rel] = digest
    return entries, problems


def verify(root: Path) -> list[str]:
    """One line per problem; empty when the bundle matches its manifest exactly."""
    if not (root / MANIFEST).is_file():
        return [f"{root / MANIFEST}: missing; this is not a complete bundle"]
    entries, problems = read_manifest(root)
    try:
        present = set(bundle_files(root))
    except ValueError as exc:
        return problems + [str(exc)]
    for rel, digest in entries.items():
        if rel not in present:
            problems.append(f"{rel}: listed in {MANIFEST} but missing")
        elif (actual := sha256_file(root / rel)) != digest:
            problems.append(f"{rel}: sha256 mismatch (manifest {digest[:16]}..., file {actual[:16]}...)")
    for rel in sorted(present - entries.keys()):
        problems.append(f"{rel}: not listed in {MANIFEST} (added after the bundle was built?)")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("write", "verify"):
        print("usage: verify_manifest.py write|verify BUNDLE_DIR", file=sys.stderr)
        return 2
    root = Path(argv[1])
    if argv[0] == "write":
        out = write(root)
        print(f"{MANIFEST}: {len(out.read_text().splitlines())} files, sha256 {sha256_file(out)}")
        return 0
    problems = verify(root)
    for line in problems:
        print(f"bundle verification failed: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"bundle verified: every file matches {MANIFEST} (sha256 {sha256_file(root / MANIFEST)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
