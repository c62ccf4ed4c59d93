"""ELBO surgery benchmark (paper Table 1): how each prior spends the ELBO, on Fashion-MNIST.

For N(0, I), the VampPrior, the DP-GMM and the VMM (K = 100) this trains the image VAE and reports, on held-out
images: the posterior predictive log p(x|x), the importance-sampled evidence log p(x) (IWAE, m draws), the negative
distortion E_q log p(x|z), the rate KL(q(z|x) || p(z)), the marginal KL(q(z) || p(z)) against the aggregate posterior
and I[z; n] (see :mod:`pyro_vmm.images.surgery`), and checks log p(x) >= ELBO for every prior.

``--protocol cpu`` (default, ~30-40 min on 2 shared CPU cores) differs from the paper (facts 5.1) in:

* data: 10,000 random training images for fitting; 2,000 random test images for early stopping and for the surgery
  (paper: 60,000 / 10,000);
* networks: encoder 256-256-512 (paper 500-500-2000); D = 30 as in the paper;
* schedule: Adam lr 1e-3 (paper 1e-4), at most 40 epochs with patience 5 on the validation ELBO (paper 500 / 20);
* estimators: m = 100 draws per image as in the paper, but only the first 10 of them enter the aggregate-posterior
  terms (the paper uses all 100: ~1e10 Gaussian densities).

``--protocol paper``: the paper's settings (a GPU job)::

    python benchmarks/elbo_surgery.py --protocol paper --device cuda --seeds 0,1,2,3,4

Writes ``benchmarks/results/elbo_surgery.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pyro_vmm.data.images import load_fashion_mnist  # noqa: E402
from pyro_vmm.images.training import TrainingConfig, train_image_model  # noqa: E402
from pyro_vmm.models.vae import ImageVAE  # noqa: E402
from pyro_vmm.images.surgery import elbo_surgery  # noqa: E402
from pyro_vmm.utils import atomic_path, set_seed  # noqa: E402

PROTOCOLS = {
    "cpu": dict(n_train=10000, n_eval=2000, hidden=[256, 256, 512], latent_dim=30, batch_size=256, lr=1e-3,
                epochs=40, patience=5, n_samples=100, n_aggregate_samples=10),
    "paper": dict(n_train=None, n_eval=None, hidden=[500, 500, 2000], latent_dim=30, batch_size=256, lr=1e-4,
                  epochs=500, patience=20, n_samples=100, n_aggregate_samples=100),
}
PRIORS = ("normal", "vampprior", "gmm", "vmm")
COLUMNS = ("log_px_given_x", "log_px", "neg_distortion", "rate", "marginal_kl", "mutual_information", "elbo")
HEADERS = ("log p(x|x)", "log p(x)", "E_q log p(x|z)", "KL(q(z|x)||p(z))", "KL(q(z)||p(z))", "I[z;n]", "ELBO")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="cpu")
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "images" / "fashion_mnist"))
    p.add_argument("--priors", default=",".join(PRIORS))
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "elbo_surgery.json"))
    return p.parse_args(argv)


def format_table(summary: dict) -> str:
    head = f"{'prior':<10}" + "".join(f"{h:>20}" for h in HEADERS) + f"{'IWAE>=ELBO':>12}"
    lines = [head, "-" * len(head)]
    for prior, s in summary.items():
        cells = "".join(f"{s[c]['mean']:>12.2f} ± {s[c]['sd']:<5.2f}" for c in COLUMNS)
        lines.append(f"{prior:<10}{cells}{str(s['iwae_ge_elbo']):>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    proto = PROTOCOLS[args.protocol]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    priors = [p.strip() for p in args.priors.split(",") if p.strip()]
    rows, start = [], time.perf_counter()
    for seed in seeds:
        train = load_fashion_mnist(args.data_dir, "train", subset=proto["n_train"], seed=seed, download=False)
        test = load_fashion_mnist(args.data_dir, "test", subset=proto["n_eval"], seed=seed, download=False)
        for prior in priors:
            set_seed(seed)
            model = ImageVAE.from_data(train.x, prior=prior, n_components=100, seed=seed,
                                       n_latent=proto["latent_dim"], hidden=proto["hidden"])
            config = TrainingConfig(epochs=proto["epochs"], batch_size=proto["batch_size"], lr=proto["lr"],
                                    patience=proto["patience"], seed=seed, device=args.device)
            history = train_image_model(model, train.x, config, x_val=test.x)
            t0 = time.perf_counter()
            s = elbo_surgery(model, test.x, n_samples=proto["n_samples"],
                             n_aggregate_samples=proto["n_aggregate_samples"], seed=seed)
            row = dict(prior=prior, seed=seed, **s.to_dict(), epochs_run=history.epochs_run,
                       best_epoch=history.best_epoch, train_seconds=round(history.seconds, 1),
                       surgery_seconds=round(time.perf_counter() - t0, 1), iwae_ge_elbo=bool(s.log_px >= s.elbo))
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    summary = {}
    for prior in priors:
        sel = [r for r in rows if r["prior"] == prior]
        stats = {c: {"mean": float(np.mean([r[c] for r in sel])),
                     "sd": float(np.std([r[c] for r in sel], ddof=1)) if len(sel) > 1 else 0.0} for c in COLUMNS}
        summary[prior] = {**stats, "runs": len(sel), "iwae_ge_elbo": all(r["iwae_ge_elbo"] for r in sel),
                          "log_n": sel[0]["log_n"]}
    table = format_table(summary)
    print()
    print(table)
    payload = dict(
        benchmark="elbo_surgery", protocol=args.protocol, protocol_settings=proto, dataset="fashion_mnist",
        summary=summary, runs=rows, table=table,
        all_iwae_ge_elbo=all(r["iwae_ge_elbo"] for r in rows),
        command="python benchmarks/elbo_surgery.py " + " ".join(sys.argv[1:] if argv is None else argv),
        machine=f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), device {args.device}",
        date=time.strftime("%Y-%m-%d"), total_minutes=round((time.perf_counter() - start) / 60, 1),
    )
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out} ({payload['total_minutes']} min)")
    return 0 if payload["all_iwae_ge_elbo"] else 1


if __name__ == "__main__":
    sys.exit(main())
