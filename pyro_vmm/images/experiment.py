"""The image-clustering experiment behind ``pyro-vmm images`` / ``images-sweep`` and ``benchmarks/images_clustering.py``:
per-data-set presets, the train / validation split, building, training and scoring one model, and the figures
(prior predictive samples per utilized cluster, paper Figure 2; utilized clusters and NMI against batch size, Figure 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PRESETS",
    "DatasetPreset",
    "build_model",
    "component_distributions",
    "fit_and_score",
    "load_split",
    "plot_prior_predictive",
    "plot_sweep",
]


@dataclass(frozen=True)
class DatasetPreset:
    """Per-data-set defaults (used for any option left unset on the command line)."""

    latent_dim: int
    hidden: tuple[int, ...]
    batch_size: int
    lr: float
    epochs: int
    patience: int
    init_sigma: float = 1.0  #: initial likelihood scale sigma (the paper: 1)
    em_objective: str = "textbook"  #: 'textbook' EM or the reference code's objective ('reference')


#: digits: a small CPU-sized model (D = 10, sigma started at 0.2 so that 64 pixels keep the latent informative, the
#: reference code's EM objective, batch 128 for up to 150 epochs: about a minute on one core; see docs/RESULTS.md);
#: MNIST / Fashion-MNIST: the paper's networks and schedule (GPU-sized)
PRESETS = {
    "digits": DatasetPreset(
        latent_dim=10, hidden=(128, 128, 256), batch_size=128, lr=1e-3, epochs=150, patience=30, init_sigma=0.2,
        em_objective="reference",
    ),
    "mnist": DatasetPreset(latent_dim=10, hidden=(500, 500, 2000), batch_size=256, lr=1e-4, epochs=500, patience=20),
    "fashion_mnist": DatasetPreset(
        latent_dim=30, hidden=(500, 500, 2000), batch_size=256, lr=1e-4, epochs=500, patience=20
    ),
}


def load_split(dataset: str, data_dir: str | None, subset: int | None, seed: int, download: bool = True):
    """(train ImageData, validation ImageData) -- validation images drive early stopping (their labels only with
    ``--monitor nmi``).

    digits: a random 10% of the 1,797 images.  MNIST / Fashion-MNIST: the test split (as the reference code), or with
    ``subset`` a random ``subset`` of all 70,000 images split 6:1.
    """
    from ..data.images import ImageData, load_image_dataset

    if dataset == "digits" or subset is not None:
        data = load_image_dataset(dataset, data_dir, split="all", subset=subset, seed=seed, download=download)
        n_val = max(1, round(len(data) * (0.1 if dataset == "digits" else 1 / 7)))
        import torch

        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
        tr, va = perm[n_val:], perm[:n_val]
        return (
            ImageData(data.x[tr], data.labels[tr], data.image_shape, data.name),
            ImageData(data.x[va], data.labels[va], data.image_shape, data.name),
        )
    return (
        load_image_dataset(dataset, data_dir, split="train", seed=seed, download=download),
        load_image_dataset(dataset, data_dir, split="test", seed=seed, download=download),
    )


def build_model(settings: dict, x_train):
    from ..models.vade import VaDE
    from ..models.vae import ImageVAE

    cls = VaDE if settings["prior"] == "vade" else ImageVAE
    prior = "gmm" if settings["prior"] == "vade" else settings["prior"]
    return cls.from_data(
        x_train,
        prior=prior,
        n_components=settings["n_clusters"],
        seed=settings["seed"],
        n_latent=settings["latent_dim"],
        hidden=settings["hidden"],
        **({} if settings["prior"] == "vade" else {"init_sigma": settings.get("init_sigma", 1.0)}),
    )


def fit_and_score(settings: dict, train, val, progress: bool = True) -> tuple[object, dict]:
    """Train one model with ``settings``; return it and a JSON-ready result (scores on train + validation)."""
    import torch

    from .evaluation import evaluate_clustering
    from .training import TrainingConfig, train_image_model, train_vade
    from ..utils import set_seed

    set_seed(settings["seed"])
    model = build_model(settings, train.x)
    config = TrainingConfig(
        epochs=settings["epochs"],
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        prior_lr_ratio=settings["prior_lr_ratio"],
        patience=settings["patience"],
        seed=settings["seed"],
        device=settings["device"],
        progress=progress,
        attach_responsibilities=settings.get("em_objective", "textbook") == "reference",
        monitor=settings.get("monitor", "elbo"),
    )
    start = time.perf_counter()
    if settings["prior"] == "vade":
        pre = settings.get("vade_pretrain_epochs")
        history = train_vade(model, train.x, config, x_val=val.x, pretrain_epochs=pre, y_val=val.labels)
    else:
        history = train_image_model(model, train.x, config, x_val=val.x, y_val=val.labels)
    seconds = time.perf_counter() - start
    x_all, y_all = torch.cat([train.x, val.x]), torch.cat([train.labels, val.labels])
    scores = evaluate_clustering(model, x_all, y_all, sample=True, seed=settings["seed"])
    result = dict(
        settings=settings,
        scores=scores.to_dict(),
        n_train=len(train),
        n_validation=len(val),
        n_evaluated=int(x_all.shape[0]),
        train_seconds=round(seconds, 2),
        history=history.to_dict(),
    )
    return model, result


# ----------------------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------------------
def component_distributions(prior, encoder):
    """``(log_pi (K,), components with batch shape (K,))`` of a prior's marginal p(z)."""
    import torch

    from ..mixtures import GaussianMixture

    p_z = prior.latent_dist(encoder)
    if isinstance(p_z, (torch.distributions.MixtureSameFamily, GaussianMixture)):
        return torch.log_softmax(p_z.mixture_distribution.logits, -1), p_z.component_distribution
    return torch.zeros(1, device=p_z.mean.device), p_z.expand((1,))


def plot_prior_predictive(model, x, probs, image_shape, path, max_rows: int = 40, seed: int = 0) -> int:
    """Paper Figure 2/4 layout, one row per utilized cluster sorted by pi (at most ``max_rows`` rows).

    Column 0: the cluster's most probable member :math:`\\arg\\max_n q(c=k|z_n)` with :math:`\\pi_k` printed under it;
    then ``round(10 pi_k / max pi)`` decoded draws from the cluster's predictive component.  Returns the number of
    utilized clusters.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from ..utils import atomic_path, eval_mode

    used = np.unique(probs.argmax(1))
    gen_state = torch.random.fork_rng(devices=[])
    with torch.no_grad(), eval_mode(model), gen_state:
        torch.manual_seed(seed)
        log_pi, comps = component_distributions(model.prior, model.pseudo_encoder)
        pi = log_pi.exp().cpu().numpy()
        order = used[np.argsort(-pi[used], kind="stable")][:max_rows]
        n_draws = {int(k): max(1, int(round(10 * pi[k] / pi[used].max()))) for k in order}
        draws = comps.sample((max(n_draws.values()),))  # (S, K, D)
        images = model.decode(draws).clamp(-1, 1).cpu().numpy()  # (S, K, P)
    members = x[probs.argmax(0)].cpu().numpy()  # (K, P): most probable member of every cluster
    n_cols = 1 + max(n_draws.values())
    height = 0.62 * len(order) + 0.6
    fig, axes = plt.subplots(len(order), n_cols, figsize=(0.6 * n_cols + 0.6, height), squeeze=False)
    for row, k in enumerate(order):
        for col in range(n_cols):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(col == 0)
            img = members[k] if col == 0 else (images[col - 1, k] if col <= n_draws[int(k)] else None)
            if img is None:
                ax.axis("off")
                continue
            ax.imshow(img.reshape(image_shape), cmap="gray_r", vmin=-1, vmax=1)
        axes[row, 0].set_ylabel(f"{pi[k]:.3f}", rotation=0, ha="right", va="center", fontsize=7)
    title = f"{model.prior.name}: {len(used)} utilized clusters (rows, by pi; first column: most probable member)"
    if len(used) > len(order):
        title += f"; top {len(order)} shown"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.3 / height))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return int(len(used))


def plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    """Utilized clusters and unmerged NMI (mean and every seed) against batch size."""
    import matplotlib.pyplot as plt
    import numpy as np

    from ..utils import atomic_path

    sizes = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in zip(axes, ("utilized_clusters", "nmi_unmerged"), ("utilized clusters", "NMI (unmerged)")):
        vals = [[r[key] for r in rows if r["batch_size"] == b] for b in sizes]
        for b, v in zip(sizes, vals):
            ax.scatter([b] * len(v), v, color="C0", alpha=0.5, s=12)
        ax.plot(sizes, [np.mean(v) for v in vals], color="C0", marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
    if rows and "n_classes" in rows[0]:
        axes[0].axhline(rows[0]["n_classes"], color="C3", ls=":", lw=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
