"""Speed and scale of VMM-scVI against scvi-tools SCVI on synthetic counts (issue 5).

Four parts, each optional:

``--epochs-table``  per-epoch wall and CPU time and peak RSS growth of VMM-scVI (K = 100) and scvi-tools SCVI on the
    same synthetic counts (``--cells``, default 10k and 100k, x 2000 genes, 2 batches), batch sizes 128 and 1024,
    same networks (1 x 128 hidden, latent 10, ZINB), the two models alternating within one process; the median of
    ``--epochs`` timed epochs after one warm-up epoch.  ``--accelerator gpu`` runs both on the same CUDA device
    (VMM-scVI copies the dense counts to the device once; SCVI uses scvi-tools' own loader; epochs are timed with
    the device synchronised at both ends).
``--k-table``       the EM step's share of a training step (VI step, z draw + EM step, timed separately on the same
    minibatch) for K in {10, 100, 500} at batch sizes 128 and 1024, and a straight-line fit of step time against K
    (R^2) per batch size.
``--em-breakdown``  where the EM step's time goes: z draw, pseudo-input pass, Pyro's ``TraceEnum_ELBO`` loss and the
    same mixture term in plain torch, the whole EM step and the VI step, per batch size and K.
``--million``       one epoch of VMM-scVI on 1,000,000 sparse synthetic cells x 2000 genes (CSR end to end) with the
    peak resident memory of the training process (the data are generated and written to ``--million-data`` by a
    separate process first; ``--backed`` opens the file on disk and streams minibatches from it, ``--backed
    --load-backed`` loads the on-disk matrix into memory once instead).

Synthetic counts: 10 cell types with Dirichlet(0.05) gene profiles, a per-batch log-normal gene shift, library
sizes log-normal around 1,500 UMIs, negative-binomial draws (theta = 5), stored as CSR: about 12 % non-zero
(kang_ifnb_2800 at 2,000 HVGs: 6.4 %, median 349 UMIs), i.e. denser and heavier than typical data.

Run from the repository root, e.g.::

    python benchmarks/scale_benchmark.py --epochs-table --k-table
    python benchmarks/scale_benchmark.py --million

Prints a table per part and writes ``benchmarks/results/scale_benchmark.json`` (parts merge into the file).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def synthetic_counts(n_cells: int, n_genes: int = 2000, n_batches: int = 2, n_types: int = 10, library: float = 1500.0,
                     concentration: float = 0.05,
                     seed: int = 0, chunk: int = 50_000):
    """AnnData with CSR counts (float32), ``obs['batch']`` and ``obs['cell_type']``; built chunk-wise, never dense."""
    import anndata
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    profiles = rng.dirichlet(np.full(n_genes, concentration), size=n_types)  # (T, G) gene proportions per type
    shift = np.exp(rng.normal(0, 0.3, size=(n_batches, n_genes)))
    types = rng.integers(n_types, size=n_cells)
    batches = rng.integers(n_batches, size=n_cells)
    blocks = []
    for start in range(0, n_cells, chunk):
        t, b = types[start : start + chunk], batches[start : start + chunk]
        lib = library * np.exp(rng.normal(0, 0.3, size=len(t)))
        mu = profiles[t] * shift[b]
        mu *= (lib / mu.sum(1))[:, None]
        theta = 5.0
        counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
        blocks.append(sparse.csr_matrix(counts))
        del counts, mu
    x = sparse.vstack(blocks, format="csr")
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i}" for i in batches]), "cell_type": pd.Categorical([f"t{i}" for i in types])},
        index=[f"c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    return anndata.AnnData(X=x, obs=obs, var=var)


def _device_name(accelerator: str) -> str:
    """What the epoch table ran on, for the JSON's ``machine`` field."""
    if accelerator == "gpu" and torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return "CPU only"


def _timer():
    from pyro_vmm.callbacks import EpochTimer

    return EpochTimer()


def fit_scvi(adata, batch_size: int, epochs: int, seed: int, accelerator: str = "cpu"):
    import scvi

    scvi.settings.seed = seed
    a = adata.copy()
    scvi.model.SCVI.setup_anndata(a, batch_key="batch")
    model = scvi.model.SCVI(a, n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="zinb",
                            encode_covariates=True, deeply_inject_covariates=False)
    timer = _timer()
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=0.9, early_stopping=False,
                enable_progress_bar=False, check_val_every_n_epoch=10**6, callbacks=[timer], accelerator=accelerator,
                plan_kwargs=dict(lr=1e-3, n_epochs_kl_warmup=None, weight_decay=0.0, eps=1e-7))
    return timer


def fit_vmm(adata, batch_size: int, epochs: int, seed: int, k: int = 100, prior: str = "vmm", copy: bool = True,
            accelerator: str = "cpu", **train_kwargs):
    from pyro_vmm import VMMSCVI

    a = adata.copy() if copy and adata.filename is None else adata
    VMMSCVI.setup_anndata(a, batch_key="batch")
    model = VMMSCVI(a, prior=prior, n_clusters=k, n_latent=10, n_hidden=128, n_layers=1, seed=seed)
    timer = _timer()
    model.train(max_epochs=epochs, batch_size=batch_size, train_size=0.9, early_stopping=False,
                enable_progress_bar=False, check_val_every_n_epoch=10**6, seed=seed, callbacks=[timer],
                accelerator=accelerator, **train_kwargs)
    return timer


def epochs_table(args) -> list[dict]:
    rows = []
    for n in args.cells:
        adata = synthetic_counts(n, seed=args.seed)
        for bs in args.batch_sizes:
            models = [("scvi-tools SCVI", fit_scvi, {}), ("VMM-scVI (K=100)", fit_vmm, {})]
            if args.normal_row:
                models.append(("ours, N(0,I) prior", fit_vmm, {"prior": "normal"}))
            for name, fn, extra in models:
                gc.collect()
                rss0 = peak_rss_gb()
                timer = fn(adata, bs, args.epochs + 1, args.seed, accelerator=args.accelerator, **extra)
                wall, cpu = timer.wall[1:], timer.cpu[1:]
                rows.append(dict(cells=n, genes=adata.n_vars, batch_size=bs, model=name,
                                 s_per_epoch=statistics.median(wall), cpu_s_per_epoch=statistics.median(cpu),
                                 cells_per_s=0.9 * n / statistics.median(wall), epoch_wall_s=wall,
                                 peak_rss_gb=peak_rss_gb(), peak_rss_growth_gb=peak_rss_gb() - rss0))
                print(f"  {n:>7} cells  batch {bs:>5}  {name:<18} {rows[-1]['s_per_epoch']:8.2f} s/epoch", flush=True)
            scvi_row = rows[-len(models)]
            for row in rows[-len(models) + 1 :]:
                row["ratio_to_scvi"] = row["s_per_epoch"] / scvi_row["s_per_epoch"]
                row["cpu_ratio_to_scvi"] = row["cpu_s_per_epoch"] / scvi_row["cpu_s_per_epoch"]
        del adata
    print(f"\n{'cells':>8} {'batch':>6} {'model':<18} {'s/epoch':>9} {'CPU s':>8} {'cells/s':>9} {'ratio':>6}")
    for r in rows:
        ratio = f"{r['ratio_to_scvi']:.2f}" if "ratio_to_scvi" in r else "1.00"
        print(f"{r['cells']:>8} {r['batch_size']:>6} {r['model']:<18} {r['s_per_epoch']:>9.2f} "
              f"{r['cpu_s_per_epoch']:>8.2f} {r['cells_per_s']:>9.0f} {ratio:>6}")
    return rows


def _step_setup(adata, bs: int, k: int, seed: int):
    """VMM-scVI with K components and the two step functions training runs, on the first ``bs`` cells."""
    from pyro_vmm import VMMSCVI
    from pyro_vmm.infer import sample_latent
    from pyro_vmm.scvi._trainingplan import VMMTrainingPlan

    x = torch.as_tensor(adata.X[:bs].toarray())
    b = torch.as_tensor(adata.obs["batch"].cat.codes.to_numpy()[:bs, None].astype(np.int64))
    model = VMMSCVI(adata, prior="vmm", n_clusters=k, n_latent=10, n_hidden=128, n_layers=1, seed=seed)
    plan = VMMTrainingPlan(model.module)
    vi_opt, em_opt = plan.configure_optimizers()  # the optimisers training uses (fused Adam where supported)
    args_, kwargs = model.module._get_fn_args_from_batch({"X": x, "batch": b})
    module, svi = model.module, plan.svi

    def vi():
        module.zero_grad(set_to_none=True)
        svi.vi_loss(*args_, **kwargs).backward()
        vi_opt.step()

    def draw():
        return sample_latent(module, *args_, latent_site=svi.latent_site, **kwargs)

    def em():
        module.zero_grad(set_to_none=True)
        svi.em_loss_at(draw()).backward()
        em_opt.step()

    return module, svi, vi, draw, em


def _clock(fn, n: int, rounds: int = 5) -> float:
    """Median over ``rounds`` rounds of ``n / rounds`` calls (ms per call), after 5 warm-ups: robust to a busy
    neighbour."""
    for _ in range(5):
        fn()
    per_round = max(1, n // rounds)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        times.append((time.perf_counter() - t0) / per_round * 1e3)
    return statistics.median(times)


def k_table(args) -> dict:
    """Time the VI step and the z-draw + EM step on the same minibatches for each K."""
    import pyro

    from pyro_vmm import VMMSCVI

    adata = synthetic_counts(args.k_cells, seed=args.seed)
    VMMSCVI.setup_anndata(adata, batch_key="batch")
    rows = []
    for bs, k in [(bs, k) for bs in args.k_batch_sizes for k in args.ks]:
        _, _, vi, _, em = _step_setup(adata, bs, k, args.seed)
        with pyro.validation_enabled(False):
            vi_ms, em_ms = _clock(vi, args.k_reps), _clock(em, args.k_reps)
        rows.append(dict(batch_size=bs, K=k, vi_ms=vi_ms, em_ms=em_ms, step_ms=vi_ms + em_ms,
                         em_share=em_ms / (vi_ms + em_ms)))
    fits = {}
    print(f"\n{'batch':>6} {'K':>5} {'VI ms':>8} {'EM ms':>8} {'step ms':>8} {'EM share':>9}")
    for bs in args.k_batch_sizes:
        sub = [r for r in rows if r["batch_size"] == bs]
        for r in sub:
            print(f"{bs:>6} {r['K']:>5} {r['vi_ms']:>8.2f} {r['em_ms']:>8.2f} {r['step_ms']:>8.2f} {r['em_share']:>9.1%}")
        ks = np.array([r["K"] for r in sub], float)
        ts = np.array([r["step_ms"] for r in sub])
        slope, intercept = np.polyfit(ks, ts, 1)
        r2 = float(1 - ((ts - (slope * ks + intercept)) ** 2).sum() / ((ts - ts.mean()) ** 2).sum())
        fits[str(bs)] = dict(slope_ms_per_k=float(slope), intercept_ms=float(intercept), r2=r2)
        print(f"  batch {bs}: step time = {intercept:.2f} ms + {slope * 1e3:.2f} us x K  (R^2 = {r2:.3f})")
    return dict(rows=rows, fits=fits, cells=args.k_cells)


def _breakdown_one(adata, bs: int, k: int, args) -> dict:
    """The parts of :func:`em_breakdown` for one batch size and K."""
    import pyro

    from pyro_vmm.infer import _empty_guide, _frozen
    from pyro_vmm.mixtures import gaussian_expected_log_lik

    module, svi, vi, draw, em = _step_setup(adata, bs, k, args.seed)
    prior, encoder, z = module.prior, svi.pseudo_encoder, draw()

    def pseudo():
        with _frozen(svi.vi_parameters()):
            return prior.mixture_params(encoder)

    params = pseudo()

    def pyro_loss():
        return svi.em_elbo.differentiable_loss(prior.em_model, _empty_guide, z, encoder, svi.attach_responsibilities,
                                               params)

    def torch_loss():
        ell = gaussian_expected_log_lik(z, params.loc, params.prec_tril, params.loc_cov)
        return -torch.logsumexp(ell + params.log_pi, -1).mean()

    with pyro.validation_enabled(False):
        parts = {"z draw": _clock(draw, args.k_reps), "pseudo pass": _clock(pseudo, args.k_reps),
                 "TraceEnum loss": _clock(pyro_loss, args.k_reps), "torch mix term": _clock(torch_loss, args.k_reps),
                 "EM step": _clock(em, args.k_reps), "VI step": _clock(vi, args.k_reps)}
    return dict(batch_size=bs, K=k, ms=parts, em_share=parts["EM step"] / (parts["EM step"] + parts["VI step"]))


def em_breakdown(args) -> dict:
    r"""Where the EM step's time goes, per part, on one minibatch of each batch size, for each K.

    Parts (ms per call), each timed alone as training runs it: ``z draw`` (guide in eval mode, no gradient);
    ``pseudo pass``, :math:`u_k \to q_\phi(\mu_k \mid u_k)` with the graph to :math:`u` kept (networks frozen);
    ``TraceEnum loss``, Pyro's ``TraceEnum_ELBO`` loss of the EM program given those mixture parameters (forward
    only); for scale, ``torch mix term``, the same mixture term in plain torch,
    :math:`-\frac1B\sum_n \log\sum_k \pi_k e^{\ell_{nk}}` (no hyperprior sites: Pyro's tracing and enumeration
    cost the difference); ``EM step``, the whole step (draw, pseudo pass, loss, backward, Adam); ``VI step``.
    """
    from pyro_vmm import VMMSCVI

    adata = synthetic_counts(args.k_cells, seed=args.seed)
    VMMSCVI.setup_anndata(adata, batch_key="batch")
    rows = [_breakdown_one(adata, bs, k, args) for bs in args.k_batch_sizes for k in args.ks]
    names = list(rows[0]["ms"])
    print(f"\n{'batch':>6} {'K':>5} " + " ".join(f"{n:>14}" for n in names) + f" {'EM share':>9}")
    for r in rows:
        print(f"{r['batch_size']:>6} {r['K']:>5} " + " ".join(f"{r['ms'][n]:>14.2f}" for n in names)
              + f" {r['em_share']:>9.1%}")
    print("  (ms per call, median of 5 rounds after 5 warm-ups)")
    return dict(rows=rows, cells=args.k_cells)


def make_million_data(path: Path, n_cells: int, seed: int) -> None:
    """Write the synthetic CSR set to ``path`` (run in its own process, so its peak memory is not the trainer's)."""
    t0 = time.perf_counter()
    adata = synthetic_counts(n_cells, seed=seed)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)  # runs/ does not exist on a fresh checkout
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
    print(f"wrote {path}: {adata.n_obs:,} x {adata.n_vars} CSR, {adata.X.nnz / adata.n_obs / adata.n_vars:.1%} non-zero, "
          f"{time.perf_counter() - t0:.0f} s, generator peak RSS {peak_rss_gb():.2f} GB")


def million(args) -> dict:
    """One epoch of VMM-scVI on the million-cell set, read from disk in this process (in memory or backed)."""
    import subprocess

    import anndata

    path = Path(args.million_data)
    if not path.exists():
        subprocess.run([sys.executable, __file__, "--make-million-data", str(path), "--million-cells",
                        str(args.million_cells), "--seed", str(args.seed)], check=True)
    t0 = time.perf_counter()
    adata = anndata.read_h5ad(path, backed="r" if args.backed else None)
    nnz = int(adata.X.nnz) if not args.backed else None
    load_s = time.perf_counter() - t0
    print(f"read {path} ({'backed' if args.backed else 'in memory'}) in {load_s:.0f} s; peak RSS {peak_rss_gb():.2f} GB",
          flush=True)
    streamed = bool(args.backed and not args.load_backed)
    reading = {"stream_backed": not args.load_backed}
    if streamed and args.million_workers:
        reading["num_workers"] = args.million_workers
    timer = fit_vmm(adata, args.million_batch_size, 1, args.seed, copy=False, datasplitter_kwargs=reading)
    out = dict(cells=int(adata.n_obs), genes=int(adata.n_vars), nnz=nnz, batch_size=args.million_batch_size,
               epoch_s=timer.wall[0], epoch_cpu_s=timer.cpu[0], peak_rss_gb=peak_rss_gb(), backed=bool(args.backed),
               streamed=streamed, reader_workers=reading.get("num_workers", 0), load_s=load_s)
    how = "streamed from disk" if streamed else ("backed, loaded once" if args.backed else "in memory")
    if reading.get("num_workers"):
        how += f", {reading['num_workers']} reader process(es)"
    print(f"one epoch on {adata.n_obs:,} sparse cells ({how}): {out['epoch_s']:.0f} s, "
          f"peak RSS {out['peak_rss_gb']:.2f} GB")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs-table", action="store_true")
    p.add_argument("--no-normal-row", dest="normal_row", action="store_false",
                   help="leave out the third model of the epochs table: this package's scVI with the N(0, I) prior "
                        "(the same program, loader and loop without pseudo-inputs or EM step: the VMM's own cost)")
    p.add_argument("--k-table", action="store_true")
    p.add_argument("--million", action="store_true")
    p.add_argument("--em-breakdown", action="store_true",
                   help="time the parts of the EM step (z draw, pseudo-input pass, TraceEnum loss, ...)")
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--ks", type=int, nargs="+", default=[10, 100, 500])
    p.add_argument("--k-cells", type=int, default=2000)
    p.add_argument("--k-batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--k-reps", type=int, default=40)
    p.add_argument("--million-cells", type=int, default=1_000_000)
    p.add_argument("--million-batch-size", type=int, default=1024)
    p.add_argument("--million-data", default=str(Path("runs") / "synthetic_1M.h5ad"),
                   help="h5ad of the million-cell set (generated in a separate process when missing)")
    p.add_argument("--backed", action="store_true",
                   help="open the million-cell file backed (on disk): minibatches are streamed from it")
    p.add_argument("--load-backed", action="store_true",
                   help="with --backed: load the matrix into memory once instead of streaming it (the old way)")
    p.add_argument("--million-workers", type=int, default=0,
                   help="with --backed: worker processes reading the streamed minibatches ahead (num_workers)")
    p.add_argument("--make-million-data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--accelerator", default="cpu", choices=("cpu", "gpu"),
                   help="device of both models in --epochs-table (gpu: the same CUDA device for both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "scale_benchmark.json"))
    args = p.parse_args(argv)
    if args.make_million_data:
        make_million_data(Path(args.make_million_data), args.million_cells, args.seed)
        return 0
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        p.error("--accelerator gpu needs a CUDA device, and torch sees none here; run with --accelerator cpu")
    if not (args.epochs_table or args.k_table or args.million or args.em_breakdown):
        p.error("choose at least one of --epochs-table, --k-table, --million, --em-breakdown")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    out_path = Path(args.out)
    payload = json.loads(out_path.read_text()) if out_path.exists() else {"benchmark": "scale_benchmark"}
    meta = dict(command="python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
                date=datetime.date.today().isoformat(),
                machine=f"{platform.machine()}, {os.cpu_count()} cores, {_device_name(args.accelerator)}, "
                        f"{args.threads} torch thread(s)",
                torch=torch.__version__)
    if args.epochs_table:
        payload["epochs_table"] = dict(meta, rows=epochs_table(args), load_average=os.getloadavg()[0])
    if args.k_table:
        payload["k_table"] = dict(meta, **k_table(args), load_average=os.getloadavg()[0])
    if args.em_breakdown:
        payload["em_breakdown"] = dict(meta, **em_breakdown(args), load_average=os.getloadavg()[0])
    if args.million:
        key = "million" if not args.backed else ("million_backed" if args.load_backed else "million_streamed")
        if key == "million_streamed" and args.million_workers:
            key += f"_{args.million_workers}workers"
        payload[key] = dict(meta, **million(args), load_average=os.getloadavg()[0])
    from pyro_vmm.utils import atomic_path

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
