"""Writing files into the image tree."""

from __future__ import annotations

from pathlib import Path


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Create `path` (and its parents) with `text` and exactly `mode`, whatever the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
