"""Errors and message helpers of :mod:`pyro_vmm.validation`: name what is wrong and where."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import numpy as np

#: how many names a message lists before it writes "..."
N_SHOWN = 5


class InputError(ValueError):
    """A user input (data, key, hyperparameter, file) is unusable; the message says where and how to fix it."""


class InputWarning(UserWarning):
    """A user input is usable but probably not what was intended (e.g. genes without any count)."""


def _first(names: Sequence[Any], n: int = N_SHOWN) -> str:
    shown = ", ".join(repr(str(x)) for x in list(names[:n]))
    return shown + (", ..." if len(names) > n else "")


def _closest(key: str, choices: Sequence[str]) -> list[str]:
    choices = [str(c) for c in choices]
    folded = [c for c in choices if c.lower() == key.lower() and c != key]
    return folded + [c for c in difflib.get_close_matches(key, choices, n=3, cutoff=0.6) if c not in folded]


class _Names:
    """Turns (row, column) positions into 'cell 'x' (row 3), gene 'y' (column 7)' when names are known."""

    def __init__(self, obs_names: Sequence | None = None, var_names: Sequence | None = None) -> None:
        self.obs, self.var = obs_names, var_names

    def cell(self, i: int) -> str:
        return f"cell {str(self.obs[i])!r} (row {i})" if self.obs is not None else f"row {i}"

    def gene(self, j: int) -> str:
        return f"gene {str(self.var[j])!r} (column {j})" if self.var is not None else f"column {j}"

    def at(self, pos: tuple[int, int, float]) -> str:
        return f"{self.cell(pos[0])}, {self.gene(pos[1])}"

    @staticmethod
    def _positions(idx: np.ndarray) -> str:
        return ", ".join(str(int(i)) for i in idx[:N_SHOWN]) + (", ..." if len(idx) > N_SHOWN else "")

    def cells(self, idx: np.ndarray) -> str:
        if self.obs is None:
            return f"rows {self._positions(idx)}"
        return _first([self.obs[i] for i in idx[: N_SHOWN + 1]])

    def genes(self, idx: np.ndarray) -> str:
        if self.var is None:
            return f"columns {self._positions(idx)}"
        return _first([self.var[j] for j in idx[: N_SHOWN + 1]])
