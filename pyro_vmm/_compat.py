"""Compatibility shims for third-party packages, kept in one place.

pymde (used through ``scvi.model.utils.mde`` for MDE figures) imports ``torchvision`` at import time, only for its
dataset downloaders.  No CPU build of torchvision matches the CPU torch wheel pyro-vmm pins, and the CUDA
torchvision wheel breaks ``import torchmetrics`` (and so ``import scvi``) when torch is a CPU build.  pyro-vmm
therefore installs pymde without its dependencies (``pip install --no-deps pymde``) and imports it here with a
placeholder ``torchvision`` module that is removed again right after, so no other library ever sees it.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from types import ModuleType

__all__ = ["import_pymde"]

PYMDE_HINT = "MDE figures need pymde; install it without torchvision: pip install --no-deps pymde==0.3.0"


def import_pymde() -> ModuleType:
    """Import pymde, tolerating a missing (or unusable) torchvision."""
    if "pymde" in sys.modules:
        return sys.modules["pymde"]
    try:
        import pymde

        return pymde
    except ModuleNotFoundError as err:
        if err.name == "pymde":
            raise ImportError(PYMDE_HINT) from err
        if err.name != "torchvision":
            raise
    placeholder = types.ModuleType("torchvision")
    placeholder.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
    sys.modules["torchvision"] = placeholder
    try:
        import pymde
    finally:
        if sys.modules.get("torchvision") is placeholder:
            del sys.modules["torchvision"]
    return pymde
