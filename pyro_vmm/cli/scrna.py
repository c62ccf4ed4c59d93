"""``pyro-vmm scrna``: integrate and cluster a single-cell RNA-seq data set with scVI + a VMM prior.

    pyro-vmm scrna --data FILE.h5ad --batch-key batch --labels-key cell_type --prior vmm --out DIR

Steps: read raw counts (``X`` or ``--layer``) -> seurat_v3 highly variable genes (batch-aware) -> train
``pyro_vmm.VMMSCVI`` -> write into ``DIR``:

- ``adata.h5ad``: the input cells on the model's genes (it loads as is: ``VMMSCVI.load("DIR/model",
  adata=anndata.read_h5ad("DIR/adata.h5ad"))``), all genes kept in ``.raw`` (``raw.var["highly_variable"]`` marks
  the genes used), with ``obsm["X_vmm"]`` (posterior means E_q[z|x]), ``obs["vmm_cluster"]`` (the final clusters,
  :meth:`VMMSCVI.get_cluster_assignments`), ``obsm["vmm_cluster_probs"]`` (q(c|z), N x K) and
  ``uns["vmm_cluster_of_component"]`` (the cluster of each of the K components, -1 for one not reported);
- ``metrics.json``: settings, data sizes, utilized clusters, clustering metrics vs ``--labels-key`` (when given),
  final training/validation ELBOs, runtime, and scIB metrics of the latent and of an unintegrated PCA (unless
  ``--no-scib``);
- ``mde.png``: MDE of the latent coloured by batch, cell type and VMM cluster (paper Figure 3 layout);
- ``clusters.png`` (with ``--labels-key`` and/or ``--batch-key``): the cell types and the batch mix of each VMM
  cluster, clusters numbered as in ``mde.png``;
- ``markers.csv`` and ``markers.png``: marker genes of every VMM cluster (scvi-tools' ``change``-mode differential
  expression of the cluster against all other cells, batch-corrected; ``VMMSCVI.cluster_markers``) and their dot
  plot, clusters numbered as in ``mde.png`` (unless ``--no-markers``);
- ``training.png``: −ELBO (train, validation), the EM loss and the utilized clusters per epoch;
- ``model/``: the saved model (``VMMSCVI.load("DIR/model", adata)``);
- ``scib.log`` (with the scIB metrics): scib-metrics' log lines (e.g. the labels kBET skips), kept off the terminal.

All outputs are first written into a staging folder inside ``DIR`` and moved into place together only when every
one of them is complete, so a failed run leaves no partial output behind.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from pyro_vmm.defaults import DEFAULTS, check_merge_at
from pyro_vmm.outputs import environment, json_safe, last_value, on_model_genes, staged, store_embedding

from . import add_command, add_io_args

#: files and folders the command writes into --out
OUTPUTS = ("adata.h5ad", "metrics.json", "mde.png", "clusters.png", "markers.csv", "markers.png", "training.png",
           "model", "scib.log")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "scrna", "integrate batches and cluster cells of an .h5ad count matrix (scVI + VMM prior)",
        "Train scVI with a VampPrior Mixture prior on raw counts: the cells get the latent (obsm['X_vmm']) and the "
        "clusters (obs['vmm_cluster'], obsm['vmm_cluster_probs']), with their marker genes.", OUTPUTS,
    )
    io = add_io_args(p, "AnnData file with raw counts", "layer holding the raw counts (default: X)")
    io.add_argument("--batch-key", default=None, help="obs column with the batch (omit for a single batch)")
    io.add_argument("--labels-key", default=None, help="obs column with known cell types, used for evaluation only")
    io.add_argument(
        "--categorical-covariate-keys", nargs="+", default=None, metavar="COLUMN",
        help="obs columns of extra categorical covariates (e.g. donor), one-hot into the decoder, as scvi-tools'",
    )
    io.add_argument(
        "--continuous-covariate-keys", nargs="+", default=None, metavar="COLUMN",
        help="obs columns of continuous covariates (e.g. percent_mito), given to the decoder as they are",
    )
    io.add_argument(
        "--size-factor-key", default=None, metavar="COLUMN",
        help="obs column of positive size factors used as the library size instead of each cell's total count",
    )
    io.add_argument("--n-top-genes", type=int, default=2000, help="seurat_v3 highly variable genes (0: all genes)")
    io.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")
    m = p.add_argument_group("model")
    m.add_argument("--prior", default="vmm", choices=("vmm", "gmm", "vampprior", "normal"), help="latent prior")
    m.add_argument("--n-clusters", type=int, default=DEFAULTS.n_clusters, help="K, the maximum number of clusters")
    m.add_argument("--n-latent", type=int, default=DEFAULTS.n_latent, help="latent dimensions")
    m.add_argument("--likelihood", default="zinb", choices=("zinb", "nb"), help="count likelihood")
    t = p.add_argument_group("training")
    t.add_argument(
        "--max-epochs",
        type=int,
        default=None,
        help="epochs (default: scvi-tools' heuristic, 400 up to 20,000 cells and fewer above, as SCVI.train(); "
        "the KL term is warmed up over all of them); see pyro_vmm/defaults.py",
    )
    t.add_argument(
        "--batch-size", type=int, default=DEFAULTS.batch_size, help="minibatch size (also sets the hyperprior strength)"
    )
    t.add_argument("--lr", type=float, default=DEFAULTS.lr, help="learning rate of the VI step (Adam)")
    t.add_argument(
        "--prior-lr-ratio",
        type=float,
        default=DEFAULTS.prior_lr_ratio,
        help="EM-step learning rate = lr x this ratio (larger prunes more clusters; paper Figure 5, "
        "benchmarks/scrna_tuning.py)",
    )
    t.add_argument(
        "--patience", type=int, default=0, help="early-stopping patience in epochs (0: no early stopping, as SCVI)"
    )
    t.add_argument(
        "--merge-at", type=float, nargs="*", default=list(DEFAULTS.merge_at), metavar="FRACTION",
        help="merge moves on the mixture at these fractions of the run (default: %(default)s; no value: none, the "
        "paper's algorithm); see pyro_vmm/defaults.py",
    )
    add_run_args(t)
    t.add_argument("--no-scib", action="store_true", help="skip the scIB metrics (they take a minute or more)")
    t.add_argument(
        "--no-markers", action="store_true", help="skip the marker genes of the clusters (differential expression)"
    )
    p.set_defaults(func=run)


def add_run_args(group) -> None:
    """The options every single-cell subcommand shares: seed, accelerator, progress bars and the MDE figure."""
    group.add_argument("--seed", type=int, default=0, help="random seed (a CPU run is repeatable)")
    group.add_argument("--accelerator", default="auto", help="'auto', 'cpu', 'gpu', ... (Lightning)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--no-mde", action="store_true", help="skip the MDE figure")


# ---------------------------------------------------------------------------------------------------------------
def _check_args(args: argparse.Namespace) -> None:
    for name in ("n_clusters", "n_latent", "max_epochs", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("lr", "prior_lr_ratio"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.n_top_genes < 0 or args.patience < 0:
        raise ValueError("--n-top-genes and --patience must be >= 0")
    check_merge_at(args.merge_at, "--merge-at")
    check_out(args.out, OUTPUTS, args.overwrite)


def check_out(out: str, outputs: tuple[str, ...], overwrite: bool) -> None:
    """``--out`` must be a folder (or not exist yet) and hold none of ``outputs`` unless ``--overwrite``."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out!r} exists and is not a folder; choose another path")
    present = [name for name in outputs if (path / name).exists()]
    if present and not overwrite:
        raise ValueError(
            f"--out {out!r} already holds {', '.join(present)}; pass --overwrite to replace them or choose "
            "another folder"
        )


def run(args: argparse.Namespace) -> int:
    """Run the ``scrna`` job described by parsed ``args``; returns the exit code (0)."""
    t_start = time.perf_counter()
    _check_args(args)

    import numpy as np

    from pyro_vmm.data.scrna import read_counts, select_hvg
    from pyro_vmm.utils import atomic_path

    settings = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    adata = read_counts(args.data, layer=args.layer)
    from pyro_vmm.validation import validate_obs_key

    validate_obs_key(adata, "--batch-key", args.batch_key)  # before any computation: present, no missing values
    validate_obs_key(adata, "--labels-key", args.labels_key)
    validate_obs_key(adata, "--size-factor-key", args.size_factor_key)
    for key in args.categorical_covariate_keys or []:
        validate_obs_key(adata, "--categorical-covariate-keys", key)
    for key in args.continuous_covariate_keys or []:
        validate_obs_key(adata, "--continuous-covariate-keys", key)
    log = (lambda *a: None) if args.no_progress else (lambda *a: print("[pyro-vmm scrna]", *a, file=sys.stderr))
    log(f"read {adata.n_obs} cells x {adata.n_vars} genes from {args.data}")

    hvg = select_hvg(adata, n_top_genes=args.n_top_genes, batch_key=args.batch_key)
    empty = np.asarray(hvg.X.sum(axis=1)).ravel() == 0
    if empty.any():
        warnings.warn(
            f"{int(empty.sum())} cells have no counts in the {hvg.n_vars} selected genes and are left out",
            stacklevel=2,
        )
        hvg = hvg[~empty].copy()
        adata = adata[~empty].copy()
    adata.var["highly_variable"] = adata.var_names.isin(hvg.var_names)
    log(f"training on {hvg.n_obs} cells x {hvg.n_vars} highly variable genes")

    from pyro_vmm import VMMSCVI
    from pyro_vmm.metrics import cluster_batch_mixing

    VMMSCVI.setup_anndata(
        hvg,
        batch_key=args.batch_key,
        size_factor_key=args.size_factor_key,
        categorical_covariate_keys=args.categorical_covariate_keys,
        continuous_covariate_keys=args.continuous_covariate_keys,
    )
    model = VMMSCVI(hvg, prior=args.prior, n_clusters=args.n_clusters, n_latent=args.n_latent,
                    gene_likelihood=args.likelihood, seed=args.seed)
    t_train = time.perf_counter()
    model.train(
        max_epochs=args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        prior_lr_ratio=args.prior_lr_ratio,
        early_stopping=args.patience > 0,
        early_stopping_patience=max(args.patience, 1),
        merge_at=tuple(args.merge_at),
        accelerator=args.accelerator,
        seed=args.seed,
        enable_progress_bar=not args.no_progress,
    )
    train_s = time.perf_counter() - t_train
    history = model.history
    epochs = len(history["elbo_train"]) if "elbo_train" in history else None

    _, probs, assign = store_embedding(adata, model)

    batches = adata.obs[args.batch_key].astype(str).to_numpy() if args.batch_key else None
    n_batches = int(np.unique(batches).size) if batches is not None else 1
    metrics: dict[str, Any] = {
        "settings": settings,
        "data": {
            "path": str(args.data),
            "n_cells": int(adata.n_obs),
            "n_genes": int(adata.n_vars),
            "n_genes_used": int(hvg.n_vars),
            "n_cells_left_out_empty": int(empty.sum()),
            "n_batches": n_batches,
            "n_labels": int(adata.obs[args.labels_key].nunique()) if args.labels_key else None,
        },
        "utilized_clusters": int(np.unique(assign).size),
        "cluster_sizes": {str(k): int(v) for k, v in zip(*np.unique(assign, return_counts=True), strict=True)},
        # H(batch | cluster) / H(batch): 1 = clusters as mixed across batches as the data, 0 = split by batch
        "cluster_batch_mixing": cluster_batch_mixing(assign, batches) if n_batches > 1 else None,
        "clustering": None,
        "elbo": {
            "train_final": last_value(history, "elbo_train"),
            "validation_final": last_value(history, "elbo_validation"),
            "all_cells": -float(model.get_elbo()),  # -ELBO per cell, like the others
        },
        "epochs_trained": epochs,
        "runtime_s": {"train": train_s, "per_epoch": train_s / epochs if epochs else None},
        "scib": None,
        "markers": None,
        "environment": environment(model),
    }
    scib_log = None
    if args.labels_key:
        from pyro_vmm.evaluation import clustering_scores

        labels = adata.obs[args.labels_key].astype(str).to_numpy()
        # score the final clusters (one-hot, so the scores' argmax is the reported cluster of each cell)
        metrics["clustering"] = clustering_scores(np.eye(int(assign.max()) + 1)[assign], labels).to_dict()
        if not args.no_scib:
            from pyro_vmm.evaluation import ScibConfig, pca_embedding, scib_table

            log("computing scIB metrics")
            adata.obsm["X_pca_unintegrated"] = pca_embedding(hvg, n_comps=50, seed=args.seed)
            batch_key = args.batch_key
            if batch_key is None:
                batch_key = "_batch"
                adata.obs[batch_key] = "0"
            config = ScibConfig(pre_integrated_key="X_pca_unintegrated")
            # scIB's per-label INFO lines go to scib.log, not the terminal
            scib_log = Path(tempfile.mkdtemp(prefix="pyro-vmm-scib-")) / "scib.log"
            table = scib_table(adata, batch_key, args.labels_key, ["X_vmm", "X_pca_unintegrated"], config=config,
                               log_file=scib_log)
            metrics["scib"] = {emb: row.to_dict() for emb, row in table.iterrows()}
            if args.batch_key is None:
                del adata.obs[batch_key]

    markers = None
    if not args.no_markers:
        log("finding the marker genes of each cluster (differential expression)")
        t_de = time.perf_counter()
        markers = model.cluster_markers(seed=args.seed, silent=args.no_progress)
        metrics["markers"] = {
            "clusters_with_markers": int(markers["cluster"].nunique()),
            "skipped_clusters_under_10_cells": markers.attrs["skipped_clusters"],
            "runtime_s": time.perf_counter() - t_de,
        }

    out = Path(args.out)
    with staged(out, OUTPUTS) as staging:
        if not args.no_mde:
            from pyro_vmm.plotting import mde_figure

            log("drawing the MDE figure")
            keys = [k for k in (args.batch_key, args.labels_key) if k] + ["vmm_cluster"]
            titles = {k: v for k, v in ((args.batch_key, "Batch correction"), (args.labels_key, "Bio conservation")) if k}
            mde_figure(adata, "X_vmm", color_keys=keys, path=staging / "mde.png", seed=args.seed, titles=titles)
        if args.labels_key or n_batches > 1:
            from pyro_vmm.plotting import cluster_composition

            cluster_composition(
                adata.obs["vmm_cluster"],
                labels=adata.obs[args.labels_key] if args.labels_key else None,
                batches=batches if n_batches > 1 else None,
                path=staging / "clusters.png",
            )
        if markers is not None:
            from pyro_vmm.plotting import marker_dotplot

            with atomic_path(staging / "markers.csv") as tmp:
                markers.to_csv(tmp, index=False)
            if len(markers):
                marker_dotplot(adata, markers, cluster_key="vmm_cluster", path=staging / "markers.png")
        if epochs:
            from pyro_vmm.plotting import training_curves

            training_curves(history, path=staging / "training.png")
        model.save(str(staging / "model"), overwrite=True)
        with atomic_path(staging / "adata.h5ad") as tmp:
            on_model_genes(adata, hvg.var_names).write_h5ad(tmp)
        if scib_log is not None and scib_log.exists():
            shutil.move(scib_log, staging / "scib.log")
            shutil.rmtree(scib_log.parent, ignore_errors=True)
        metrics["runtime_s"]["total"] = time.perf_counter() - t_start
        with atomic_path(staging / "metrics.json") as tmp:
            tmp.write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False) + "\n")
    log(
        f"done in {metrics['runtime_s']['total']:.0f} s: {metrics['utilized_clusters']} clusters used; "
        f"outputs in {out}/"
    )
    return 0
