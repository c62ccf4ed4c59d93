"""The default recipe (pyro_vmm.defaults): epochs, the minimum cluster size and the final clusters."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from pyro_vmm.defaults import DEFAULTS, final_components, min_cluster_size, training_epochs


def test_training_epochs_is_scvi_tools_heuristic():
    from scvi.model._utils import get_max_epochs_heuristic

    for n in (10, 499, 2800, 20_000, 50_000, 1_000_000):
        assert training_epochs(n) == get_max_epochs_heuristic(n)
    with pytest.raises(ValueError):
        training_epochs(0)


def test_min_cluster_size_rule():
    assert min_cluster_size(499) == 10
    assert min_cluster_size(2000) == 10
    assert min_cluster_size(2800) == 14
    assert min_cluster_size(1_000_000) == 5000


def test_final_components_fold_small_components_into_their_next_most_probable():
    rng = np.random.default_rng(0)
    # components 0, 1 own 50 cells each; component 2 owns 4 cells whose runner-up is component 1; 3 owns none
    probs = np.full((104, 4), 0.01)
    probs[:50, 0] = 0.9
    probs[50:100, 1] = 0.9
    probs[100:, 2], probs[100:, 1] = 0.6, 0.3
    probs += rng.uniform(0, 1e-3, probs.shape)
    kept = final_components(probs, min_size=10)
    np.testing.assert_array_equal(kept, [0, 1])
    assign = kept[probs[:, kept].argmax(1)]
    assert (assign[100:] == 1).all()
    np.testing.assert_array_equal(final_components(probs, min_size=1), [0, 1, 2])  # nothing below 1 cell


def test_final_components_let_a_small_component_grow_by_absorbing_cells():
    # A: 30 cells; B: 8 cells; C: 5 cells whose runner-up is B. Dropping C first (smallest) gives B 13 >= 10 cells.
    probs = np.zeros((43, 3))
    probs[:30, 0] = 1
    probs[30:38, 1] = 1
    probs[38:, 2], probs[38:, 1] = 0.7, 0.2
    np.testing.assert_array_equal(final_components(probs, min_size=10), [0, 1])
    assert final_components(probs[:, :1], min_size=100).tolist() == [0]  # at least one is kept


def test_api_and_cli_share_the_defaults():
    """VMMSCVI(...), VMMSCVI.train() and `pyro-vmm scrna` default to the same recipe; no default reads labels."""
    import argparse

    from pyro_vmm import VMMSCVI
    from pyro_vmm.cli import scrna

    init = inspect.signature(VMMSCVI.__init__).parameters
    train = inspect.signature(VMMSCVI.train).parameters
    parser = argparse.ArgumentParser()
    scrna.add_parser(parser.add_subparsers())
    args = parser.parse_args(["scrna", "--data", "x.h5ad", "--out", "o"])
    assert init["n_clusters"].default == args.n_clusters == DEFAULTS.n_clusters
    assert init["n_latent"].default == args.n_latent == DEFAULTS.n_latent
    assert init["encode_covariates"].default is DEFAULTS.encode_covariates is True
    assert train["max_epochs"].default is None and args.max_epochs is None  # both: training_epochs(n_cells)
    assert train["batch_size"].default == args.batch_size == DEFAULTS.batch_size
    assert train["lr"].default == args.lr == DEFAULTS.lr
    assert train["prior_lr_ratio"].default == args.prior_lr_ratio == DEFAULTS.prior_lr_ratio
    assert train["early_stopping"].default is DEFAULTS.early_stopping is False and args.patience == 0
    assert train["n_epochs_kl_warmup"].default == "auto"


@pytest.mark.parametrize("prior", ["normal", "vmm"])
def test_kl_weight_scales_exactly_the_kl_term(toy_vae, prior):
    """vi_loss(beta) = -E log p(x|z) + beta KL at the same draws: linear in beta, the ELBO at beta = 1, and at
    beta = 0 the reconstruction term alone (computed here independently)."""
    import pyro
    import pyro.distributions as dist
    import torch

    from pyro_vmm.infer import AlternatingSVI

    torch.manual_seed(0)
    module = toy_vae(prior=prior).eval()
    svi = AlternatingSVI(module, make_optimizers=False)
    x = torch.randn(32, 6)

    def loss(beta):
        pyro.set_rng_seed(1)
        return float(svi.vi_loss(x, kl_weight=beta))

    l0, l1, lh = loss(0.0), loss(1.0), loss(0.3)
    assert lh == pytest.approx(l0 + 0.3 * (l1 - l0), rel=1e-5, abs=1e-5)
    pyro.set_rng_seed(1)
    assert l1 == pytest.approx(float(svi.vi_loss(x)), rel=1e-6)
    with torch.no_grad():
        pyro.set_rng_seed(1)
        z = module._q(x).rsample()
        recon = -dist.Normal(module.decoder(z), 1.0).to_event(1).log_prob(x).mean()
    assert l0 == pytest.approx(float(recon), rel=1e-4)
    assert l1 != pytest.approx(l0)
