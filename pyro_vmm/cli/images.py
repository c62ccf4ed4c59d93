"""``pyro-vmm images`` and ``pyro-vmm images-sweep``: cluster images with the VAE of ``models/vae.py``.

    pyro-vmm images --dataset digits --prior vmm --out runs/digits
    pyro-vmm images --dataset mnist --data-dir ../shared/data/images/mnist --subset 20000 --out runs/mnist
    pyro-vmm images-sweep --dataset digits --batch-sizes 16,32,64,128 --out runs/digits-sweep

``images`` writes ``metrics.json`` (clustering scores on every image used, training history, settings),
``model.pt`` (``state_dict`` + model config) and ``prior_samples.png`` (paper Figure 2 layout, one row per utilized
cluster sorted by pi: the cluster's most probable member, then ``round(10 pi_k / max pi)`` decoded draws from its
predictive component) and ``training.png`` (−ELBO, EM loss and utilized clusters per epoch).  ``images-sweep``
trains one model per batch size (and seed) and writes ``sweep.json`` and ``sweep.png`` (utilized clusters and
unmerged NMI against batch size, paper Figure 1).  Labels are used only for the reported scores, never for training
or early stopping.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from ..images.experiment import PRESETS, fit_and_score, load_split, plot_prior_predictive, plot_sweep
from . import add_command

PRIOR_CHOICES = ("normal", "vampprior", "gmm", "vmm", "vade")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _preset_default(field: str) -> str:
    """``(default: digits X, mnist Y, ...)``: the per-data-set value an unset option takes."""
    def show(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    return "(default: " + ", ".join(f"{name} {show(getattr(p, field))}" for name, p in PRESETS.items()) + ")"


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", choices=tuple(PRESETS), default="digits", help="data set (default: digits)")
    p.add_argument("--data-dir", default=None, help="folder with the idx files (default: download + cache)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading missing idx files")
    p.add_argument("--subset", type=int, default=None,
                   help="use N random images (train + validation) (default: all images)")
    p.add_argument("--latent-dim", type=int, default=None, help="D (default: digits 10, MNIST 10, Fashion-MNIST 30)")
    p.add_argument("--n-clusters", type=int, default=None, help="K, the most clusters (default 100; VaDE 10)")
    p.add_argument("--hidden", type=_int_list, default=None,
                   help=f"encoder hidden sizes, e.g. 500,500,2000 {_preset_default('hidden')}")
    p.add_argument("--prior-lr-ratio", type=float, default=1.0, help="EM learning rate / VI learning rate")
    p.add_argument("--init-sigma", type=float, default=None,
                   help="initial likelihood scale sigma (default: digits 0.2, MNIST / Fashion-MNIST 1 as the paper)")
    p.add_argument("--em-objective", choices=("textbook", "reference"), default=None,
                   help="EM objective: responsibilities held fixed (textbook) or left on the graph as the reference "
                        "code (default: digits reference, others textbook)")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate of the VI step {_preset_default('lr')}")
    p.add_argument("--epochs", type=int, default=None, help=f"maximum number of epochs {_preset_default('epochs')}")
    p.add_argument("--patience", type=int, default=None,
                   help=f"early-stopping patience (epochs) {_preset_default('patience')}")
    p.add_argument(
        "--monitor", choices=("elbo", "nmi"), default="elbo",
        help="early-stopping criterion: the validation ELBO (label-free) or the paper's validation "
             "NMI-unmerged (uses the validation labels to pick the epoch, as the paper does)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (a CPU run is repeatable)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 for digits, else torch's choice)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--out", required=True, help="output folder")


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers,
        "images",
        help="cluster images (digits, MNIST, Fashion-MNIST) with a VAE and one of the priors",
        description="Train the paper's image VAE with a prior (or VaDE), report clustering scores, save the model "
        "and a figure of prior predictive samples per utilized cluster.",
    )
    p.add_argument("--prior", choices=PRIOR_CHOICES, default="vmm", help="latent prior, or 'vade' (default: vmm)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"minibatch size (tunes the number of clusters) {_preset_default('batch_size')}")
    p.add_argument(
        "--vade-pretrain-epochs", type=int, default=None, help="VaDE pre-training epochs (default round(5 B / 100))"
    )
    _add_common(p)
    p.set_defaults(func=run_images)

    s = add_command(
        subparsers,
        "images-sweep",
        help="utilized clusters and NMI against batch size (paper Figure 1)",
        description="Train one model per batch size and seed; plot utilized clusters and unmerged NMI.",
    )
    s.add_argument("--prior", choices=("gmm", "vmm"), default="vmm", help="latent prior")
    s.add_argument("--batch-sizes", type=_int_list, default=[16, 32, 64, 128, 256], help="comma-separated list")
    s.add_argument("--n-seeds", type=int, default=1, help="seeds per batch size: seed, seed+1, ...")
    _add_common(s)
    s.set_defaults(func=run_sweep)


# ----------------------------------------------------------------------------------------------------------------
# shared pieces
# ----------------------------------------------------------------------------------------------------------------
def _settings(args: argparse.Namespace, batch_size: int | None = None) -> dict:
    preset = PRESETS[args.dataset]
    prior = getattr(args, "prior", "vmm")
    pick = lambda value, default: default if value is None else value  # noqa: E731
    settings = dict(
        dataset=args.dataset,
        prior=prior,
        latent_dim=pick(args.latent_dim, preset.latent_dim),
        hidden=list(pick(args.hidden, preset.hidden)),
        n_clusters=pick(args.n_clusters, 10 if prior == "vade" else 100),
        batch_size=pick(batch_size, pick(getattr(args, "batch_size", None), preset.batch_size)),
        lr=pick(args.lr, preset.lr),
        prior_lr_ratio=args.prior_lr_ratio,
        epochs=pick(args.epochs, preset.epochs),
        patience=pick(args.patience, preset.patience),
        seed=args.seed,
        subset=args.subset,
        device=args.device,
        vade_pretrain_epochs=getattr(args, "vade_pretrain_epochs", None),
        init_sigma=pick(getattr(args, "init_sigma", None), preset.init_sigma),
        em_objective=pick(getattr(args, "em_objective", None), preset.em_objective),
        monitor=getattr(args, "monitor", "elbo"),
    )
    for key in ("latent_dim", "n_clusters", "batch_size", "epochs"):
        if settings[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {settings[key]}")
    if settings["monitor"] == "nmi" and prior == "normal":
        raise ValueError("--monitor nmi early-stops on the clusters' NMI; the 'normal' prior has no clusters")
    if not settings["init_sigma"] > 0:
        raise ValueError(f"--init-sigma must be > 0, got {settings['init_sigma']}")
    return settings


def _environment() -> dict:
    import torch

    return dict(
        command="pyro-vmm " + " ".join(sys.argv[1:]),
        python=platform.python_version(),
        torch=torch.__version__,
        machine=platform.machine(),
        cpu_threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d"),
    )


def _write_json(path: Path, payload: dict) -> None:
    from ..utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    threads = args.threads or (1 if args.dataset == "digits" else None)
    if threads:
        torch.set_num_threads(threads)


def _output_dir(args: argparse.Namespace) -> Path:
    """Create the output folder -- only once there is something to write (a failed run leaves nothing behind)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------------------------
def run_images(args: argparse.Namespace) -> int:
    import torch

    from ..images.evaluation import cluster_probabilities
    from ..utils import atomic_path

    settings = _settings(args)  # validates the arguments first
    _set_threads(args)
    train, val = load_split(args.dataset, args.data_dir, args.subset, args.seed, not args.no_download)
    model, result = fit_and_score(settings, train, val, progress=not args.no_progress)
    x_all = torch.cat([train.x, val.x])
    probs = cluster_probabilities(model, x_all, sample=True, seed=args.seed)
    out = _output_dir(args)
    plot_prior_predictive(model, x_all, probs, train.image_shape, out / "prior_samples.png", seed=args.seed)
    files = ["metrics.json", "model.pt", "prior_samples.png"]
    if result["history"]["epochs_run"]:
        from ..plotting import training_curves

        h = result["history"]
        training_curves({"elbo_train": h["train_loss"], "elbo_validation": h["val_loss"],
                         "em_loss_train": h["em_loss"], "utilized_clusters_validation": h["val_clusters"],
                         **({"nmi_validation": h["val_nmi"]} if h["val_nmi"] else {})},
                        path=out / "training.png")
        files.append("training.png")
    with atomic_path(out / "model.pt") as tmp:
        torch.save({"state_dict": model.state_dict(), "config": model.config, "settings": settings}, tmp)
    result["environment"] = _environment()
    result["files"] = files
    _write_json(out / "metrics.json", result)
    s = result["scores"]
    print(
        f"{settings['prior']} on {args.dataset} ({result['n_evaluated']} images): utilized clusters "
        f"{s['utilized_clusters']}, accuracy {s['accuracy']:.3f}, NMI merged {s['nmi_merged']:.3f}, "
        f"NMI unmerged {s['nmi_unmerged']:.3f}, ARI unmerged {s['ari_unmerged']:.3f} "
        f"({result['train_seconds']:.0f} s, {result['history']['epochs_run']} epochs) -> {out}"
    )
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    if args.n_seeds < 1:
        raise ValueError(f"--n-seeds must be >= 1, got {args.n_seeds}")
    for batch_size in args.batch_sizes:
        _settings(args, batch_size=batch_size)  # validates every setting before any training
    _set_threads(args)
    train, val = load_split(args.dataset, args.data_dir, args.subset, args.seed, not args.no_download)
    rows = []
    for batch_size in args.batch_sizes:
        for seed in range(args.seed, args.seed + args.n_seeds):
            settings = _settings(args, batch_size=batch_size)
            settings["seed"] = seed
            _, result = fit_and_score(settings, train, val, progress=not args.no_progress)
            s = result["scores"]
            rows.append(
                dict(
                    batch_size=batch_size,
                    seed=seed,
                    utilized_clusters=s["utilized_clusters"],
                    nmi_unmerged=s["nmi_unmerged"],
                    accuracy=s["accuracy"],
                    n_classes=int(train.labels.unique().numel()),
                    epochs_run=result["history"]["epochs_run"],
                    train_seconds=result["train_seconds"],
                )
            )
            print(
                f"batch size {batch_size:5d} seed {seed}: {s['utilized_clusters']} clusters, "
                f"NMI unmerged {s['nmi_unmerged']:.3f}"
            )
    title = f"{args.prior} on {args.dataset}: {len(train) + len(val)} images"
    out = _output_dir(args)
    plot_sweep(rows, out / "sweep.png", title)
    summary = {}
    for b in args.batch_sizes:
        sel = [r for r in rows if r["batch_size"] == b]
        summary[str(b)] = {
            key: sum(r[key] for r in sel) / len(sel) for key in ("utilized_clusters", "nmi_unmerged", "accuracy")
        }
    best = max(summary, key=lambda b: summary[b]["nmi_unmerged"])
    payload = dict(
        settings=_settings(args, batch_size=args.batch_sizes[0]) | {"batch_sizes": args.batch_sizes},
        runs=rows,
        mean_by_batch_size=summary,
        best_batch_size_by_nmi=int(best),
        environment=_environment(),
        note="NMI uses labels for reporting only; picking the batch size by it is label-based model selection.",
    )
    _write_json(out / "sweep.json", payload)
    print(f"best batch size by mean unmerged NMI: {best} -> {out}")
    return 0

