"""Files shipped inside installed Python distributions (models, corpora, dictionaries), found
without importing the package: several of the data packages lmforge reads pull heavy or
unwanted dependencies on import, and some have no importable module at all."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def installed_path(package: str, relative: str) -> Path | None:
    """Where `relative` is inside the installed distribution `package`, or None when that
    distribution is not installed. Whether the file exists there is the caller's to check."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file(relative)))
