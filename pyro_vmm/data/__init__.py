"""Data loaders: images (``pyro_vmm.data.images``) and single-cell counts (``pyro_vmm.data.scrna``)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["shared_data_dir"]


def shared_data_dir(start: str | os.PathLike | None = None) -> Path:
    """Locate the offline data folder: ``$PYRO_VMM_DATA`` if set, else the first ``shared/data`` found beside
    ``start`` (default: the current directory) or one of its parents — e.g. ``../shared/data`` from the repo root."""
    env = os.environ.get("PYRO_VMM_DATA")
    if env:
        path = Path(env)
        if not path.is_dir():
            raise FileNotFoundError(f"PYRO_VMM_DATA={env!r} is not a directory; point it at the data folder")
        return path
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "shared" / "data"
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"no shared/data folder found above {here}; set PYRO_VMM_DATA to the folder holding scrna/ and images/"
    )
