r"""Training loop for the image models (``models/vae.py``, ``models/vade.py``).

Training (:func:`train_image_model`): shuffled minibatches, one :class:`~pyro_vmm.AlternatingSVI` step per
minibatch (VI step, then the EM step for the GMM/VMM), early stopping with best-weight restore on one of

* ``monitor="elbo"`` (default): the **validation negative ELBO** of held-out images -- labels are never looked at;
* ``monitor="nmi"``: the paper's criterion (the reference code's ``PerformanceMonitor(monitor='val_nmi')``), the
  unmerged NMI between the validation images' labels and their argmax clusters under one posterior draw.  This
  uses the validation labels to pick the epoch (label leakage, as in the paper); report it as such.

Evaluation: :mod:`pyro_vmm.images.evaluation`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..guard import NonFiniteGuard, guarded_step
from ..infer import AlternatingSVI
from ..metrics import nmi_unmerged
from ..utils import eval_mode, resolve_device, set_seed
from .evaluation import _chunks, cluster_probabilities, latent_representation

__all__ = [
    "TrainingConfig",
    "TrainingHistory",
    "fit_minibatches",
    "nmi_monitor",
    "split_validation",
    "train_image_model",
    "train_vade",
]


MONITORS = ("elbo", "nmi")


@dataclass(frozen=True)
class TrainingConfig:
    """Settings of :func:`train_image_model` (paper: lr 1e-4, batch 256, prior_lr_ratio 1, patience 100)."""

    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    prior_lr_ratio: float = 1.0
    patience: int | None = 20  #: epochs without a better validation criterion before stopping; None: never stop early
    #: early-stopping criterion: "elbo" (validation -ELBO, label-free) or "nmi" (the paper's validation NMI-u; needs
    #: the validation labels)
    monitor: str = "elbo"
    val_fraction: float = 0.1  #: share of the training images held out for the validation ELBO
    seed: int = 0
    device: str = "auto"
    progress: bool = True
    drop_last: bool = False  #: drop the last partial minibatch (the reference keeps it)
    eval_batch_size: int = 2048
    attach_responsibilities: bool = False  #: the reference's EM objective (see AlternatingSVI)
    nan_guard: bool = True  #: roll back non-finite steps and halve the learning rate (pyro_vmm.guard)
    max_nan_retries: int = 5  #: rollbacks in a row before NonFiniteError
    #: Pyro's distribution checks in the VI step (same numbers, ~15 % slower; turn on when editing a model)
    validate_distributions: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"need epochs >= 1 and batch_size >= 1, got {self.epochs}, {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience}")
        if self.monitor not in MONITORS:
            raise ValueError(f"monitor must be one of {MONITORS}, got {self.monitor!r}")


@dataclass
class TrainingHistory:
    """Per-epoch losses (per image) and how training ended."""

    train_loss: list[float] = field(default_factory=list)  #: mean -ELBO over the epoch's minibatches
    em_loss: list[float | None] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)  #: -ELBO of the validation images
    val_clusters: list[int] = field(default_factory=list)  #: distinct argmax clusters on the validation images
    val_nmi: list[float] = field(default_factory=list)  #: validation NMI-u per epoch (``monitor="nmi"`` only)
    monitor: str = "elbo"  #: the early-stopping criterion that chose ``best_epoch``
    pretrain_loss: list[float] = field(default_factory=list)  #: VaDE pre-training losses (other models: empty)
    best_epoch: int = -1  #: 0-based epoch whose weights were kept
    stop_reason: str = "max_epochs"  #: 'max_epochs' | 'early_stopping' | 'non_finite_loss'
    nan_rollbacks: int = 0  #: steps rolled back by the non-finite guard
    seconds: float = 0.0

    @property
    def epochs_run(self) -> int:
        return len(self.train_loss)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["epochs_run"] = self.epochs_run
        return out


def split_validation(x: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor | None]:
    """Random (train, validation) split of the rows of ``x``; ``val_fraction = 0`` gives ``(x, None)``."""
    n_val = int(round(val_fraction * x.shape[0]))
    if n_val == 0:
        return x, None
    if n_val >= x.shape[0]:
        raise ValueError(f"val_fraction={val_fraction} leaves no training images out of {x.shape[0]}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm[n_val:]], x[perm[:n_val]]


def _mean_over_chunks(fn: Callable[[Tensor], float], x: Tensor, size: int) -> float:
    """Image-weighted mean of a per-image-mean loss over chunks."""
    total = 0.0
    for chunk in _chunks(x, size):
        total += fn(chunk) * chunk.shape[0]
    return total / x.shape[0]


def fit_minibatches(
    module: torch.nn.Module,
    x_train: Tensor,
    x_val: Tensor | None,
    config: TrainingConfig,
    step: Callable[[Tensor], tuple[float, float | None]],
    val_loss: Callable[[Tensor], float],
    desc: str = "train",
    guard: NonFiniteGuard | None = None,
    val_score: Callable[[], float] | None = None,
) -> TrainingHistory:
    """The epoch loop shared by every image model.

    ``step(batch) -> (loss, em_loss)`` updates the parameters on one minibatch; ``val_loss(batch)`` returns the
    per-image validation loss without updating anything.  Early stopping watches ``val_loss`` over ``x_val``
    (evaluated with a fixed random stream, so successive epochs are compared on the same Monte Carlo noise) and the
    weights of the best epoch are restored at the end.  With ``val_score`` (higher is better, e.g. the validation
    NMI of :func:`nmi_monitor`; evaluated under the same fixed stream) early stopping watches it instead, and the
    validation loss is only recorded.

    With ``guard`` (a :class:`~pyro_vmm.guard.NonFiniteGuard` over the module and the optimisers ``step`` uses),
    each step runs under :func:`~pyro_vmm.guard.guarded_step`: a non-finite step is rolled back, the learning rates
    lowered, a warning logged and the minibatch skipped; too many in a row raise
    :class:`~pyro_vmm.guard.NonFiniteError`.  Without it, a non-finite training loss (divergence) ends training with
    ``stop_reason = 'non_finite_loss'`` and the best weights so far.
    """
    history = TrainingHistory(monitor="elbo" if val_score is None else "nmi")
    device = x_train.device
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    n = x_train.shape[0]
    best_loss, best_state, bad_epochs = math.inf, None, 0
    start = time.perf_counter()
    bar = tqdm(range(config.epochs), desc=desc, disable=not config.progress, leave=False)
    for epoch in bar:
        module.train()
        perm = torch.randperm(n, generator=gen).to(device)
        losses, em_losses = [], []
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            if config.drop_last and idx.numel() < config.batch_size and n >= config.batch_size:
                break
            if guard is not None:
                out: list = []

                def run(batch: Tensor = x_train[idx]) -> list:
                    out[:] = step(batch)
                    return out

                where = f"epoch {epoch}, batch {i // config.batch_size}"
                if not guarded_step(guard, run, where=where):
                    history.nan_rollbacks += 1
                    continue
                loss, em = out
                losses.append(loss)
                if em is not None:
                    em_losses.append(em)
                continue
            try:
                loss, em = step(x_train[idx])
            except ValueError as err:  # a distribution's argument check caught NaN/inf parameters
                if _finite(module):
                    raise
                warnings.warn(f"training diverged in epoch {epoch} ({str(err).splitlines()[0][:120]})", stacklevel=2)
                loss, em = math.nan, None
            losses.append(loss)
            if not math.isfinite(loss):
                break
            if em is not None:
                em_losses.append(em)
        # with a guard, NaN only means "every step of the epoch was rolled back" (the parameters are finite)
        history.train_loss.append(float(np.mean(losses)) if losses and _finite(module) else math.nan)
        history.em_loss.append(float(np.mean(em_losses)) if em_losses else None)
        if guard is None and not math.isfinite(history.train_loss[-1]):
            history.stop_reason = "non_finite_loss"
            break
        postfix = {"loss": f"{history.train_loss[-1]:.2f}"}
        if x_val is not None:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(config.seed + 1)
                vloss = _mean_over_chunks(val_loss, x_val, config.eval_batch_size)
                history.val_clusters.append(_utilized(module, x_val, config.eval_batch_size))
                criterion = vloss
                if val_score is not None:
                    history.val_nmi.append(val_score())
                    criterion = -history.val_nmi[-1]
            history.val_loss.append(vloss)
            postfix.update(val=f"{vloss:.2f}", clusters=history.val_clusters[-1])
            if val_score is not None:
                postfix.update(nmi=f"{history.val_nmi[-1]:.3f}")
            if criterion < best_loss:
                best_loss, bad_epochs, history.best_epoch = criterion, 0, epoch
                best_state = copy.deepcopy(module.state_dict())
            else:
                bad_epochs += 1
        else:
            history.best_epoch = epoch
        bar.set_postfix(postfix)
        if config.patience is not None and x_val is not None and bad_epochs >= config.patience:
            history.stop_reason = "early_stopping"
            break
    bar.close()
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    history.seconds = time.perf_counter() - start
    return history


def _finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _utilized(module: torch.nn.Module, x: Tensor, batch_size: int) -> int:
    """Distinct argmax clusters of the posterior means (label-free progress statistic)."""
    if module.prior.n_components == 1:
        return 1
    probs = cluster_probabilities(module, x, sample=False, batch_size=batch_size)
    return int(np.unique(probs.argmax(1)).size)


def _prepare(
    module: torch.nn.Module, x: Tensor, x_val: Tensor | None, config: TrainingConfig
) -> tuple[torch.device, Tensor, Tensor | None]:
    """Seed, move the module and the data to ``config.device``, hold out validation images if none were given."""
    set_seed(config.seed)
    device = resolve_device(config.device)
    module.to(device)
    if x_val is None:
        x, x_val = split_validation(x, config.val_fraction, config.seed)
    return device, x.to(device), x_val.to(device) if x_val is not None else None


def train_image_model(
    module: torch.nn.Module,
    x: Tensor,
    config: TrainingConfig = TrainingConfig(),
    x_val: Tensor | None = None,
    y_val: Tensor | np.ndarray | None = None,
) -> TrainingHistory:
    """Fit an :class:`~pyro_vmm.models.vae.ImageVAE` (any prior) with :class:`~pyro_vmm.AlternatingSVI`.

    ``x`` (N, P) are training images in [-1, 1].  Without ``x_val``, ``config.val_fraction`` of ``x`` is held out
    for early stopping.  ``y_val`` (the labels of ``x_val``) is needed by ``config.monitor="nmi"`` only.  The module
    is moved to ``config.device`` and left there, in eval mode, with the weights of the best validation epoch.
    """
    given_val = x_val is not None  # y_val labels the caller's x_val, never images held out here
    device, x, x_val = _prepare(module, x, x_val, config)
    val_score = _val_score(module, config, x_val if given_val else None, y_val)
    svi = AlternatingSVI(
        module,
        lr=config.lr,
        prior_lr_ratio=config.prior_lr_ratio,
        attach_responsibilities=config.attach_responsibilities,
        validate_vi=config.validate_distributions,
    )

    def step(batch: Tensor) -> tuple[float, float | None]:
        result = svi.step(batch)
        return result.elbo_loss, result.em_loss

    guard = _guard(module, svi.optimizers, config)
    return fit_minibatches(
        module, x, x_val, config, step, svi.evaluate_loss, desc=f"{module.prior.name}", guard=guard,
        val_score=val_score,
    )


def _val_score(module: torch.nn.Module, config: TrainingConfig, x_val, y_val) -> Callable[[], float] | None:
    """The early-stopping score for ``config.monitor`` (None: the validation loss), with clear errors for
    ``monitor="nmi"`` without what it needs."""
    if config.monitor != "nmi":
        return None
    if x_val is None or y_val is None:
        raise ValueError(
            "monitor='nmi' early-stops on the validation images' NMI, so it needs x_val and y_val (their labels); "
            "pass both, or use monitor='elbo' (label-free)"
        )
    if len(y_val) != x_val.shape[0]:
        raise ValueError(f"y_val has {len(y_val)} labels for {x_val.shape[0]} validation images")
    if module.prior.n_components < 2:
        raise ValueError(f"monitor='nmi' needs a mixture prior; the {module.prior.name!r} prior has one component")
    return nmi_monitor(module, x_val, y_val, config)


def nmi_monitor(
    module: torch.nn.Module, x_val: Tensor, y_val: Tensor | np.ndarray, config: TrainingConfig
) -> Callable[[], float]:
    """The paper's early-stopping score: unmerged NMI of ``y_val`` and argmax clusters of one draw per image.

    The draws are seeded (``config.seed + 2``), so successive epochs are scored on the same noise.  The reference
    averages per-minibatch NMIs over the validation set; this scores the whole set at once.
    """
    labels = np.asarray(y_val.cpu() if isinstance(y_val, Tensor) else y_val)

    def score() -> float:
        probs = cluster_probabilities(
            module, x_val, sample=True, batch_size=config.eval_batch_size, seed=config.seed + 2
        )
        return nmi_unmerged(probs.argmax(1), labels)

    return score


def _guard(module: torch.nn.Module, optimizers, config: TrainingConfig) -> NonFiniteGuard | None:
    return NonFiniteGuard(module, optimizers, max_retries=config.max_nan_retries) if config.nan_guard else None


def train_vade(
    module: torch.nn.Module,
    x: Tensor,
    config: TrainingConfig = TrainingConfig(),
    x_val: Tensor | None = None,
    pretrain_epochs: int | None = None,
    pretrain_lr: float = 2e-3,
    y_val: Tensor | np.ndarray | None = None,
) -> TrainingHistory:
    """Fit :class:`~pyro_vmm.models.vade.VaDE` as the reference does (facts 3.5).

    1. pre-train encoder/decoder on the reconstruction term only for ``pretrain_epochs`` (default
       ``round(5 B / 100)``) at ``pretrain_lr``;
    2. fit ``sklearn.mixture.GaussianMixture(K, covariance_type='full', reg_covar=1e-3)`` to one posterior draw of
       the training images and copy it into the prior;
    3. optimise VaDE's ELBO over *all* parameters (networks and GMM) with one Adam optimiser at ``config.lr``,
       early-stopping on ``config.monitor`` (the validation ELBO by default; the reference: validation NMI).

    The returned history covers step 3; ``history.pretrain_loss`` holds step 1's per-epoch losses.
    """
    from sklearn.mixture import GaussianMixture

    given_val = x_val is not None
    device, x, x_val = _prepare(module, x, x_val, config)
    score = _val_score(module, config, x_val if given_val else None, y_val)
    n_pre = round(5 * config.batch_size / 100) if pretrain_epochs is None else int(pretrain_epochs)

    def make_step(optimizer: torch.optim.Optimizer, kl_weight: float):
        def step(batch: Tensor) -> tuple[float, None]:
            optimizer.zero_grad(set_to_none=True)
            loss = module.loss(batch, kl_weight)
            loss.backward()
            optimizer.step()
            return float(loss.detach()), None

        return step

    def val_loss(batch: Tensor) -> float:
        with torch.no_grad(), eval_mode(module):
            return float(module.loss(batch))

    pre_history = TrainingHistory()
    if n_pre > 0:
        net_params = [p for name, p in module.named_parameters() if not name.startswith("prior.")]
        pre_opt = torch.optim.Adam(net_params, lr=pretrain_lr, eps=1e-7)
        pre_config = replace(config, epochs=n_pre, patience=None)
        pre_history = fit_minibatches(
            module,
            x,
            None,
            pre_config,
            make_step(pre_opt, 0.0),
            val_loss,
            desc="vade pre-training",
            guard=_guard(module, pre_opt, config),
        )
    z = latent_representation(module, x, sample=True, batch_size=config.eval_batch_size, seed=config.seed)
    gmm = GaussianMixture(
        module.prior.n_components, covariance_type="full", reg_covar=1e-3, random_state=config.seed
    ).fit(z.cpu().double().numpy())
    module.init_from_gaussian_mixture(gmm)
    optimizer = torch.optim.Adam(module.parameters(), lr=config.lr, eps=1e-7)
    guard = _guard(module, optimizer, config)
    history = fit_minibatches(
        module, x, x_val, config, make_step(optimizer, 1.0), val_loss, desc="vade", guard=guard, val_score=score
    )
    history.pretrain_loss = pre_history.train_loss
    return history
