"""Bundled files (the TinyWorld model and, later, its SAEs, transcoders and lenses).

Every bundled folder carries a ``SHA256SUMS`` file in the usual ``sha256sum`` format
("<hex digest>  <file name>" per line). `verify` checks a folder against it before
anything is loaded, so that a truncated download or a corrupted file fails with a
message naming the file, instead of with a confusing error deep inside torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent
CHECKSUM_FILE = "SHA256SUMS"

RESTORE_HINT = (
    "Restore it by reinstalling interplab (pip install --force-reinstall --no-deps interplab, "
    "or `git checkout -- {path}` in a clone), or retrain with `python -m interplab.tinyworld.train --out <folder>`."
)


class CorruptedFileError(RuntimeError):
    """A bundled file is missing, truncated or changed."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: str | Path) -> Path:
    """Write SHA256SUMS for every file in ``folder`` (but itself)."""
    folder = Path(folder)
    lines = [f"{sha256(p)}  {p.name}\n" for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUM_FILE]
    out = folder / CHECKSUM_FILE
    out.write_text("".join(lines))
    return out


def read_checksums(folder: Path) -> dict[str, str]:
    listing = folder / CHECKSUM_FILE
    if not listing.is_file():
        raise CorruptedFileError(
            f"{listing} is missing, so the files in {folder} cannot be verified. " + RESTORE_HINT.format(path=listing)
        )
    sums = {}
    for line in listing.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip().lstrip("*")] = digest
    return sums


def verify(folder: str | Path, names: list[str] | None = None) -> dict[str, str]:
    """Check files of ``folder`` against its SHA256SUMS; return {name: "ok"} or raise CorruptedFileError.

    Args:
        folder: a folder with a SHA256SUMS file.
        names: the files to check (default: all listed).
    """
    folder = Path(folder)
    sums = read_checksums(folder)
    results = {}
    for name in names or sorted(sums):
        path = folder / name
        if name not in sums:
            raise CorruptedFileError(
                f"{path} is not listed in {folder / CHECKSUM_FILE}. " + RESTORE_HINT.format(path=path)
            )
        if not path.is_file():
            raise CorruptedFileError(f"{path} is missing. " + RESTORE_HINT.format(path=path))
        if sha256(path) != sums[name]:
            raise CorruptedFileError(
                f"{path} is corrupted or truncated ({path.stat().st_size} bytes; its sha256 does not match "
                f"{folder / CHECKSUM_FILE}). " + RESTORE_HINT.format(path=path)
            )
        results[name] = "ok"
    return results


def bundled_folders() -> list[Path]:
    """Every bundled folder that has a checksum file."""
    return sorted(p.parent for p in WEIGHTS_DIR.glob(f"*/{CHECKSUM_FILE}"))
