"""Where K-Cloud keeps what it measures and captures (torch-free, shared by every layer)."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE_DIR = "KCLOUD_CACHE_DIR"


def cache_dir() -> Path:
    """$KCLOUD_CACHE_DIR, else $XDG_CACHE_HOME/kcloud, else ~/.cache/kcloud."""
    explicit = os.environ.get(ENV_CACHE_DIR)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kcloud"
