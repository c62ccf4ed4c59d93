"""A quiet, informative terminal: third-party noise filtered narrowly, by message and module.

- :func:`quiet_lightning` (around training): drops Lightning's ``💡 Tip: ... litlogger`` advertisement, the
  ``LeafSpec`` deprecation warning torch raises inside Lightning, and Lightning's ``log_every_n_steps`` warning
  (pyro-vmm logs once per epoch, never per step).  Every other warning and log line passes as before.
- :func:`log_to_file`: a library's logger written to a file instead of the terminal for a while (scIB's per-label
  INFO lines in ``pyro-vmm scrna``).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["log_to_file", "quiet_lightning"]

#: loggers Lightning's ``rank_zero_info`` writes to (the one in use depends on import order)
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
#: ``(message regex, category, module regex)`` of the known-harmless warnings :func:`quiet_lightning` hides
HARMLESS_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\."),
    (r"The number of training batches .* is smaller than the logging interval", Warning, r"lightning\."),
)


class _DropLitLoggerTip(logging.Filter):
    """Rejects Lightning's ``💡 Tip: ... litlogger`` advertisement; keeps every other record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not ("Tip:" in message and "litlogger" in message)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Hide the Lightning noise listed in the module docstring while the block runs (filters are restored after)."""
    tip = _DropLitLoggerTip()
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    for logger in loggers:
        logger.addFilter(tip)
    try:
        with warnings.catch_warnings():
            for message, category, module in HARMLESS_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category, module=module)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(tip)


@contextlib.contextmanager
def log_to_file(logger_name: str, path: str | Path, level: int = logging.INFO) -> Iterator[Path]:
    """Send the records of logger ``logger_name`` to ``path`` (appended) instead of its handlers while the block
    runs; its handlers, level and propagation are restored after."""
    path = Path(path)
    logger = logging.getLogger(logger_name)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for old in saved[0]:
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.level) if logger.level else level)
    logger.propagate = False
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()
        for old in saved[0]:
            logger.addHandler(old)
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
