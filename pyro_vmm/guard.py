"""Never train on with NaNs: detect a non-finite step, roll back to the last good state, lower the learning rate.

:class:`NonFiniteGuard` keeps a copy of the last good state (module ``state_dict``s, parameters *and* buffers such
as BatchNorm running statistics, plus optimiser ``state_dict``s).  After each step, :meth:`~NonFiniteGuard.check`
looks for a non-finite loss, parameter, buffer or gradient.  On failure, :meth:`~NonFiniteGuard.rollback` restores
the copy, multiplies every learning rate by ``lr_factor`` (:math:`\\eta \\leftarrow \\eta \\cdot` ``lr_factor``) and
logs a warning; after more than ``max_retries`` rollbacks in a row it raises :class:`NonFiniteError`.

In a plain loop, with :class:`pyro_vmm.infer.AlternatingSVI`::

    guard = NonFiniteGuard(vae, svi.optimizers)
    for x in loader:
        kept = guarded_step(guard, lambda: svi.step(x))   # False: rolled back, lr lowered, batch skipped

Inside a Lightning ``training_step`` with manual optimisation (``self.automatic_optimization = False``)::

    def on_train_start(self):
        self.guard = NonFiniteGuard(self.module, self.optimizers())   # LightningOptimizers are unwrapped

    def training_step(self, batch, batch_idx):
        vi_opt, em_opt = self.optimizers()
        def step():
            vi_opt.zero_grad(); vi = self.svi.vi_loss(x); self.manual_backward(vi); vi_opt.step()
            em_opt.zero_grad(); em = self.svi.em_loss(x); self.manual_backward(em); em_opt.step()
            return vi.detach(), em.detach()
        if guarded_step(self.guard, step):
            self.log("elbo_train", ...)

Learning-rate schedulers that recompute the rate from ``base_lrs`` (LambdaLR, StepLR, ...) would undo the lowering:
pass them as ``schedulers`` and their ``base_lrs`` are lowered too.  Cost per kept step: one finite-check pass and
one in-place copy of parameters, buffers and optimiser state (about 3x the parameter memory for Adam).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["NonFiniteError", "NonFiniteGuard", "guarded_step"]

_LOG = logging.getLogger(__name__)
#: messages of exceptions that mean "a value went non-finite" (torch distribution validation, failed Cholesky, ...)
_NON_FINITE_MESSAGE = re.compile(r"invalid values|\bnan\b|\binf\b|non-finite|not finite|positive-definite", re.I)


class NonFiniteError(RuntimeError):
    """Training kept producing non-finite values although it was rolled back and the learning rate lowered."""


def _as_list(items: Any) -> list:
    if items is None:
        return []
    if not isinstance(items, list | tuple):
        items = [items]
    return [i for i in items if i is not None]


def _unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    inner = getattr(opt, "optimizer", None)  # lightning.pytorch.core.optimizer.LightningOptimizer
    if not isinstance(opt, torch.optim.Optimizer) and isinstance(inner, torch.optim.Optimizer):
        return inner
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"expected torch optimizers, got a {type(opt).__name__}")
    return opt


def _copy_state(obj: Any, into: Any = None) -> Any:
    """Deep copy of a (nested) state dict; tensors are copied into ``into``'s matching tensors when possible."""
    if isinstance(obj, torch.Tensor):
        if (
            isinstance(into, torch.Tensor)
            and into.shape == obj.shape
            and into.dtype == obj.dtype
            and into.device == obj.device
        ):
            return into.copy_(obj.detach())
        return obj.detach().clone()
    if isinstance(obj, dict):
        old = into if isinstance(into, dict) else {}
        return type(obj)((k, _copy_state(v, old.get(k))) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        old = into if isinstance(into, list | tuple) and len(into) == len(obj) else [None] * len(obj)
        return type(obj)(_copy_state(v, o) for v, o in zip(obj, old, strict=True))
    return copy.deepcopy(obj)


def _loss_values(loss: Any, name: str = "loss") -> list[tuple[str, Any]]:
    """Flatten a loss (number, tensor, dataclass such as StepResult, tuple, dict, None) into (name, value) pairs."""
    if loss is None:
        return []
    if dataclasses.is_dataclass(loss) and not isinstance(loss, type):
        return [p for f in dataclasses.fields(loss) for p in _loss_values(getattr(loss, f.name), f.name)]
    if isinstance(loss, dict):
        return [p for k, v in loss.items() for p in _loss_values(v, str(k))]
    if isinstance(loss, list | tuple):
        return [p for i, v in enumerate(loss) for p in _loss_values(v, f"{name}[{i}]")]
    return [(name, loss)]


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _is_finite(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(float(value))


class NonFiniteGuard:
    """Snapshot / check / rollback around training steps (see the module docstring for how to call it).

    Parameters
    ----------
    modules
        The module(s) whose parameters and buffers are checked and restored.
    optimizers
        The optimiser(s) whose state is restored and whose learning rate is lowered (``None`` entries, e.g. the EM
        optimiser of a ``normal`` prior, are ignored; Lightning optimisers are unwrapped).
    max_retries
        Consecutive rollbacks allowed; the next one raises :class:`NonFiniteError`.
    lr_factor
        Factor in (0, 1] applied to every learning rate at each rollback.
    logger
        Where warnings go (default ``logging.getLogger("pyro_vmm.guard")``).
    schedulers
        LR schedulers whose ``base_lrs`` are lowered with the learning rates.
    agree
        Under data-parallel training, maps this process's verdict (``True``: step is fine) to the verdict of all
        processes (e.g. an all-reduce), so every rank keeps or rolls back the same steps.
    """

    def __init__(
        self,
        modules: torch.nn.Module | Sequence[torch.nn.Module],
        optimizers: Any,
        *,
        max_retries: int = 5,
        lr_factor: float = 0.5,
        logger: logging.Logger | None = None,
        schedulers: Any = None,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        self.modules: list[torch.nn.Module] = _as_list(modules)
        if not self.modules or not all(isinstance(m, torch.nn.Module) for m in self.modules):
            raise TypeError("modules must be a torch.nn.Module or a list of them")
        self.optimizers = [_unwrap_optimizer(o) for o in _as_list(optimizers)]
        self.schedulers = _as_list(schedulers)
        if isinstance(max_retries, bool) or not isinstance(max_retries, numbers.Integral) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}; e.g. max_retries=5")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor!r}; e.g. lr_factor=0.5 halves the rate")
        self.max_retries = int(max_retries)
        self.lr_factor = float(lr_factor)
        self.logger = logger if logger is not None else _LOG
        self.agree = agree
        #: rollbacks since the last kept step, and in total
        self.consecutive_rollbacks = 0
        self.n_rollbacks = 0
        #: what the last failed check found (``None`` after a passing check)
        self.last_problem: str | None = None
        self._modules_state: list[dict] | None = None
        self._optimizers_state: list[dict] | None = None

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def has_snapshot(self) -> bool:
        return self._modules_state is not None

    def _store(self) -> None:
        old_m = self._modules_state or [None] * len(self.modules)
        old_o = self._optimizers_state or [None] * len(self.optimizers)
        self._modules_state = [_copy_state(m.state_dict(), o) for m, o in zip(self.modules, old_m, strict=True)]
        self._optimizers_state = [
            _copy_state(opt.state_dict(), o) for opt, o in zip(self.optimizers, old_o, strict=True)
        ]
        self.consecutive_rollbacks = 0

    def snapshot(self) -> None:
        """Remember the current state as the last good one (refused if it holds non-finite values)."""
        problem = self._state_problem(include_grads=False)
        if problem is not None:
            raise NonFiniteError(f"refusing to snapshot a non-finite state: {problem}")
        self._store()

    def learning_rates(self) -> list[float]:
        return [float(g["lr"]) for opt in self.optimizers for g in opt.param_groups]

    # -- checks -----------------------------------------------------------------------------------------------
    def _state_problem(self, include_grads: bool = True) -> str | None:
        tensors: list[tuple[str, torch.Tensor]] = []
        for i, module in enumerate(self.modules):
            prefix = f"module {i} " if len(self.modules) > 1 else ""
            for name, p in module.named_parameters():
                tensors.append((f"{prefix}parameter {name!r}", p))
                if include_grads and p.grad is not None:
                    tensors.append((f"{prefix}gradient of {name!r}", p.grad))
            for name, b in module.named_buffers():
                if b.is_floating_point() or b.is_complex():
                    tensors.append((f"{prefix}buffer {name!r}", b))
        if not tensors:
            return None
        with torch.no_grad():
            # fast path (one reduction per tensor, one host sync): a NaN or Inf anywhere makes its tensor's sum
            # non-finite; a sum that overflows although every entry is finite is caught by the exact check below
            sums = torch.stack([_real(t).sum(dtype=torch.float32).to(tensors[0][1].device) for _, t in tensors])
            if bool(torch.isfinite(sums).all()):
                return None
            flags = torch.stack([torch.isfinite(t).all().to(tensors[0][1].device) for _, t in tensors])
            if bool(flags.all()):
                return None
            bad = [
                f"{what} ({int((~torch.isfinite(t)).sum())} of {t.numel()} entries)"
                for (what, t), ok in zip(tensors, flags.tolist(), strict=True)
                if not ok
            ]
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        return f"non-finite values in {shown}"

    def check(self, loss: Any = None) -> bool:
        """``True`` if ``loss`` and every parameter, floating buffer and gradient are finite.

        ``loss`` may be a float, a tensor, a :class:`~pyro_vmm.infer.StepResult`, a tuple/dict of them, or ``None``.
        On ``False``, :attr:`last_problem` says what went non-finite.
        """
        bad = [
            f"{name}={float(v) if not isinstance(v, torch.Tensor) or v.numel() == 1 else 'tensor'}"
            for name, v in _loss_values(loss)
            if not _is_finite(v)
        ]
        problem = f"non-finite loss ({', '.join(bad)})" if bad else self._state_problem()
        self.last_problem = problem
        return problem is None

    # -- recovery -------------------------------------------------------------------------------------------
    def rollback(self, where: str | None = None) -> None:
        """Restore the last good state and lower every learning rate; raise :class:`NonFiniteError` past the limit.

        ``where`` (e.g. ``"epoch 3, batch 7"``) names the failed step in the warning and the error.
        """
        if self._modules_state is None or self._optimizers_state is None:
            raise RuntimeError("rollback() before any snapshot(): call guard.snapshot() once before training")
        lrs = [[g["lr"] for g in opt.param_groups] for opt in self.optimizers]
        for module, state in zip(self.modules, self._modules_state, strict=True):
            module.load_state_dict(state)
            module.zero_grad(set_to_none=True)
        self.consecutive_rollbacks += 1
        self.n_rollbacks += 1
        problem = self.last_problem or "non-finite values"
        at = f" at {where}" if where else ""
        give_up = self.consecutive_rollbacks > self.max_retries
        factor = 1.0 if give_up else self.lr_factor
        for opt, state, old in zip(self.optimizers, self._optimizers_state, lrs, strict=True):
            opt.load_state_dict(_copy_state(state))  # a fresh copy: load_state_dict may alias the given tensors
            for group, lr in zip(opt.param_groups, old, strict=True):
                group["lr"] = lr * factor
        for scheduler in self.schedulers:
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
        lr_text = ", ".join(f"{lr:.3g}" for lr in self.learning_rates()) or "none"
        if give_up:
            raise NonFiniteError(
                f"training produced non-finite values {self.consecutive_rollbacks} times in a row (last{at}: "
                f"{problem}). "
                f"Each time it was rolled back to the last finite state and the learning rate multiplied by "
                f"{self.lr_factor} (now {lr_text}), without success; the model is left at the last finite state. "
                "Try: a lower learning rate, checking the input for NaN/Inf or extreme values "
                "(pyro_vmm.validation.validate_counts / validate_anndata), or gradient clipping."
            )
        self.logger.warning(
            "non-finite training step%s (%s): rolled back to the last good state, learning rate now %s "
            "(rollback %d in a row of at most %d; %d in total)",
            at,
            problem,
            lr_text,
            self.consecutive_rollbacks,
            self.max_retries,
            self.n_rollbacks,
        )


def guarded_step(
    guard: NonFiniteGuard, step_fn: Callable[[], Any], *, where: str | None = None, store: bool = True
) -> bool:
    """Run ``step_fn()`` (one optimisation step returning its loss) under ``guard``; ``True`` if the step was kept.

    Takes a first snapshot if there is none.  A step is rolled back when its loss, the parameters, buffers or
    gradients are non-finite, or when it raises an error about invalid (NaN/Inf) values, e.g. torch's distribution
    validation.  Other errors propagate unchanged; :class:`NonFiniteError` propagates past ``max_retries``.
    ``where`` names the step in the warning; ``store=False`` keeps a passing step without refreshing the snapshot
    (cheaper; a later rollback then goes back to the older snapshot).
    """
    if not guard.has_snapshot:
        guard.snapshot()
    try:
        result = step_fn()
    except (ValueError, RuntimeError) as err:
        if isinstance(err, NonFiniteError) or not _NON_FINITE_MESSAGE.search(str(err)):
            raise
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        line = next((line for line in lines if _NON_FINITE_MESSAGE.search(line)), lines[0])
        guard.last_problem = f"the step raised {type(err).__name__}: {line[:300]}"
        guard.rollback(where)
        return False
    ok = guard.check(result)
    if guard.agree is not None:
        agreed = guard.agree(ok)
        if ok and not agreed:
            guard.last_problem = "another data-parallel process found a non-finite value in this step"
        ok = agreed
    if ok:
        if store:
            guard._store()
        else:
            guard.consecutive_rollbacks = 0
        return True
    guard.rollback(where)
    return False
