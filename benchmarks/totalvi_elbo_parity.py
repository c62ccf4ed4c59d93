r"""Is the totalVI likelihood right?  Our Pyro totalVI (models/totalvi.py) with prior="normal" vs scvi-tools' TOTALVI.

Data: the two 10x PBMC CITE-seq batches of ``../shared/data/cite`` (2 x 200 cells; shared genes, the 14 shared
proteins), ``--genes`` seurat_v3 HVGs (batch-aware).  Same split (scvi-tools' DataSplitter, ``scvi.settings.seed``,
90/10; our loop trains on TOTALVI's ``train_indices``), same networks (TOTALVI's defaults: 20 latent, 256 hidden,
2 encoder layers with the batch one-hot in each, 1 decoder layer, dropout 0.2, NB genes, per-gene and per-protein
dispersion, observed library size, empirical background prior), same optimiser (Adam, lr 4e-3, eps 0.01, weight
decay 1e-6), no KL warm-up, no early stopping or LR schedule, batch size 256, ``--epochs`` epochs.  Our loop is the VI
step of :class:`pyro_vmm.infer.AlternatingSVI` (the normal prior has no EM step) over shuffled minibatches.

Validation negative ELBO per cell, mean over ``--repeats`` Monte Carlo passes (networks in eval mode), split into

* RNA reconstruction :math:`-\log p(x \mid z)`, protein reconstruction :math:`-\log p(y \mid z, \beta)`,
  :math:`\mathrm{KL}(q(z) \| p(z))` and :math:`\mathrm{KL}(q(\log\beta) \| p(\log\beta))`; their sum is the
  paper's ELBO, the acceptance figure (ours within 2 % of TOTALVI's);
* TOTALVI's ``-get_elbo`` on the same cells, which also holds two penalties of its loss that are not part of the
  paper's model (nor ours): the LogNormal(0, 1) prior on its per-batch protein efficiency and
  :math:`-10^{-3}\log\pi_{nt}`; reported beside it.

Run from the repository root:  OMP_NUM_THREADS=1 python benchmarks/totalvi_elbo_parity.py [--epochs 400]
Writes benchmarks/results/totalvi_elbo_parity.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

RESULTS = Path("benchmarks") / "results"
TERMS = ("reconst_rna", "reconst_protein", "kl_z", "kl_background")
BATCH_SIZE = 256
LR, EPS, WEIGHT_DECAY = 4e-3, 0.01, 1e-6


def load_data(n_genes: int):
    from pyro_vmm.data import shared_data_dir
    from pyro_vmm.data.cite import load_cite
    from pyro_vmm.data.scrna import select_hvg

    return select_hvg(load_cite(shared_data_dir() / "cite"), n_top_genes=n_genes, batch_key="batch")


def run_scvi(adata, epochs: int, seed: int, repeats: int) -> dict:
    import scvi
    from torch.distributions import LogNormal, Normal, kl_divergence

    scvi.settings.seed = seed
    a = adata.copy()
    scvi.model.TOTALVI.setup_anndata(a, protein_expression_obsm_key="protein_expression", batch_key="batch")
    model = scvi.model.TOTALVI(a, n_latent=20, gene_likelihood="nb")
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs, lr=LR, batch_size=BATCH_SIZE, train_size=0.9, early_stopping=False,
        reduce_lr_on_plateau=False, n_steps_kl_warmup=0, enable_progress_bar=False,
        plan_kwargs={"eps": EPS, "weight_decay": WEIGHT_DECAY},
    )
    seconds = time.perf_counter() - t0
    module = model.module.eval()
    val = np.sort(model.validation_indices)
    sums = dict.fromkeys((*TERMS, "penalties"), 0.0)
    get_elbo = []
    with torch.no_grad():
        for _ in range(repeats):
            get_elbo.append(-float(model.get_elbo(indices=val, batch_size=BATCH_SIZE)))
            for tensors in model._make_data_loader(adata=a, indices=val, batch_size=BATCH_SIZE):
                inf, gen, losses = module(tensors)
                py = gen["py_"]
                kl_back = kl_divergence(Normal(py["back_alpha"], py["back_beta"]), inf["back_mean_prior"]).sum(-1)
                penalties = (
                    -LogNormal(0.0, 1.0).log_prob(gen["per_batch_efficiency"]).sum(-1)
                    - 1e-3 * torch.nn.functional.logsigmoid(py["mixing"]).sum(-1)
                )
                parts = {
                    "reconst_rna": losses.reconstruction_loss["reconst_loss_gene"],
                    "reconst_protein": losses.reconstruction_loss["reconst_loss_protein"],
                    "kl_z": losses.kl_local["kl_div_z"],
                    "kl_background": kl_back,
                    "penalties": penalties,
                }
                for key, value in parts.items():
                    sums[key] += float(value.sum())
    terms = {k: v / (repeats * len(val)) for k, v in sums.items()}
    return {
        "terms": terms, "neg_elbo": sum(terms[k] for k in TERMS), "get_elbo": float(np.mean(get_elbo)),
        "seconds": seconds, "train_idx": np.sort(model.train_indices), "val_idx": val,
    }


def run_ours(adata, train_idx: np.ndarray, val_idx: np.ndarray, epochs: int, seed: int, repeats: int) -> dict:
    from pyro import poutine
    from torch.distributions import kl_divergence

    from pyro_vmm.infer import AlternatingSVI
    from pyro_vmm.models.totalvi import VMMTOTALVIModule, protein_background_prior
    from pyro_vmm.utils import eval_mode, set_seed

    set_seed(seed)
    x = torch.as_tensor(adata.X.toarray(), dtype=torch.float32)
    y = torch.as_tensor(adata.obsm["protein_expression"].to_numpy(), dtype=torch.float32)
    b = torch.as_tensor(adata.obs["batch"].cat.codes.to_numpy().copy(), dtype=torch.long).reshape(-1, 1)
    n_batch = len(adata.obs["batch"].cat.categories)
    mean, scale = protein_background_prior(y[train_idx].numpy(), b[train_idx].numpy(), n_batch, seed=seed)
    module = VMMTOTALVIModule(
        x.shape[1], y.shape[1], n_batch, n_latent=20, gene_likelihood="nb", prior="normal",
        protein_background_prior_mean=mean, protein_background_prior_scale=scale,
    )
    svi = AlternatingSVI(module, lr=LR, make_optimizers=False)
    opt = torch.optim.Adam(svi.vi_parameters(), lr=LR, eps=EPS, weight_decay=WEIGHT_DECAY)
    train = torch.as_tensor(train_idx)
    t0 = time.perf_counter()
    module.train()
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train))].split(BATCH_SIZE):
            opt.zero_grad(set_to_none=True)
            loss = svi.vi_loss(x[idx], b[idx], y=y[idx])
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0

    xv, yv, bv = x[val_idx], y[val_idx], b[val_idx]
    sums = dict.fromkeys(TERMS, 0.0)
    with torch.no_grad(), eval_mode(module):
        for _ in range(repeats):
            guide = poutine.trace(module.guide).get_trace(xv, bv, y=yv)
            model = poutine.trace(poutine.replay(module.model, trace=guide)).get_trace(xv, bv, y=yv)
            sums["reconst_rna"] -= float(model.nodes["x"]["fn"].log_prob(xv).sum())
            sums["reconst_protein"] -= float(model.nodes["y"]["fn"].log_prob(yv).sum())
            for site, key in (("z", "kl_z"), ("log_beta", "kl_background")):
                sums[key] += float(kl_divergence(guide.nodes[site]["fn"], model.nodes[site]["fn"]).sum())
    terms = {k: v / (repeats * len(val_idx)) for k, v in sums.items()}
    return {"terms": terms, "neg_elbo": sum(terms.values()), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20, help="Monte Carlo passes over the validation cells")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    adata = load_data(args.genes)
    ref = run_scvi(adata, args.epochs, args.seed, args.repeats)
    torch.set_num_threads(args.threads)  # in case the trainer changed it
    ours = run_ours(adata, ref.pop("train_idx"), ref["val_idx"], args.epochs, args.seed, args.repeats)
    ref.pop("val_idx")
    rel = (ours["neg_elbo"] - ref["neg_elbo"]) / abs(ref["neg_elbo"])
    within = abs(rel) <= 0.02

    print(f"\nCITE-seq PBMC, {adata.n_obs} cells x {adata.n_vars} genes + {adata.obsm['protein_expression'].shape[1]} "
          f"proteins, 2 batches, {args.epochs} epochs, batch {BATCH_SIZE}; validation -ELBO per cell "
          f"(mean of {args.repeats} MC passes)")
    print(f"{'model':<28} {'-ELBO':>10} {'RNA':>10} {'protein':>9} {'KL z':>7} {'KL bg':>7} {'rel diff':>9} "
          f"{'-get_elbo':>10} {'train s':>8}")
    for name, r in (("scvi-tools TOTALVI", ref), ('VMMTOTALVIModule "normal"', ours)):
        t = r["terms"]
        diff = (r["neg_elbo"] - ref["neg_elbo"]) / abs(ref["neg_elbo"])
        print(f"{name:<28} {r['neg_elbo']:>10.2f} {t['reconst_rna']:>10.2f} {t['reconst_protein']:>9.2f} "
              f"{t['kl_z']:>7.2f} {t['kl_background']:>7.2f} {100 * diff:>8.2f}% "
              f"{r['get_elbo'] if 'get_elbo' in r else float('nan'):>10.2f} {r['seconds']:>8.0f}")
    print(f"TOTALVI's extra penalties (efficiency prior + mixing term): {ref['terms']['penalties']:.2f} per cell")
    print(f"within 2 %: {within}")

    from pyro_vmm.utils import atomic_path, benchmark_header

    out = {
        **benchmark_header("totalvi_elbo_parity", sys.argv),
        "data": {"name": "cite (pbmc_10k + pbmc_5k, 2 x 200 cells)", "n_cells": adata.n_obs,
                 "n_genes": adata.n_vars, "n_proteins": int(adata.obsm["protein_expression"].shape[1]),
                 "hvg": "seurat_v3, batch-aware"},
        "settings": {**vars(args), "batch_size": BATCH_SIZE, "lr": LR, "adam_eps": EPS, "weight_decay": WEIGHT_DECAY,
                     "n_latent": 20, "n_hidden": 256, "n_layers_encoder": 2, "n_layers_decoder": 1,
                     "gene_likelihood": "nb", "train_size": 0.9, "kl_warmup": None},
        "definition": "validation negative ELBO per cell = -log p(x|z) - log p(y|z,beta) + KL_z + KL_background",
        "relative_difference": rel,
        "within_2_percent": within,
        "results": {"scvi_tools_totalvi": ref, "ours_normal": ours},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS / "totalvi_elbo_parity.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
