r"""``VMMLDVAE`` / ``models/ldvae.py``: the LDVAE on the generic base trains, saves and loads, and its likelihood is the
linear-decoder NB :math:`x_{ng} \sim \mathrm{NB}(\ell_n \operatorname{softmax}(W z_n + b + \beta_{s_n})_g, \theta_g)`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pyro import poutine

from _data import kang_subset
from pyro_vmm import VMMLDVAE
from pyro_vmm.models.ldvae import LDVAEModule


@pytest.fixture(scope="module")
def kang(shared_data):
    adata = kang_subset(shared_data / "scrna" / "kang_ifnb_2800.h5ad", n_cells=200, n_genes=100, seed=1)
    assert adata.obs["batch"].nunique() == 2
    return adata


@pytest.mark.parametrize("prior", ["vmm", "normal"])
def test_ldvae_trains_saves_and_loads(kang, tmp_path, prior):
    adata = kang.copy()
    VMMLDVAE.setup_anndata(adata, batch_key="batch")
    model = VMMLDVAE(adata, prior=prior, n_clusters=10, n_latent=4, seed=0)
    model.train(max_epochs=2, batch_size=64, seed=0, enable_progress_bar=False)
    assert model.is_trained and np.isfinite(model.history["elbo_train"].to_numpy()).all()
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 4)
    loadings = model.get_loadings()
    assert loadings.shape == (adata.n_vars, 4)
    assert list(loadings.index) == list(adata.var_names) and list(loadings.columns) == [f"Z_{i}" for i in range(4)]
    if prior == "vmm":
        assert model.get_cluster_probabilities().shape == (adata.n_obs, 10)
        assert model.get_cluster_assignments().shape == (adata.n_obs,)
    rho = model.get_normalized_expression(n_samples=2, return_numpy=True)
    np.testing.assert_allclose(rho.sum(1), 1.0, rtol=1e-4)

    model.save(tmp_path / "ldvae", overwrite=True)
    loaded = VMMLDVAE.load(tmp_path / "ldvae", adata=adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), latent)
    np.testing.assert_array_equal(loaded.get_loadings().to_numpy(), loadings.to_numpy())
    if prior == "vmm":
        np.testing.assert_array_equal(loaded.get_cluster_assignments(all_components=True),
                                      model.get_cluster_assignments(all_components=True))


def test_likelihood_at_fixed_z_is_the_linear_decoder_nb(kang):
    """The model's log p(x | z) at a fixed z equals torch's NB with mean softmax(W z + b + beta_s) * library, with W, b
    and beta_s read from the decoder's weight matrix by hand."""
    torch.manual_seed(0)
    rows = np.r_[:16, kang.n_obs - 16 : kang.n_obs]  # cells are sorted by batch: take both ends
    x = torch.as_tensor(kang.X[rows].toarray(), dtype=torch.float32)
    batch = torch.as_tensor(kang.obs["batch"].cat.codes.to_numpy()[rows].copy(), dtype=torch.long)
    assert 0 < int(batch.sum()) < 32  # both batches present
    module = LDVAEModule(x.shape[1], 2, n_latent=3, prior="normal")
    with torch.no_grad():  # away from the zero initialisation of the dispersion and the bias
        module.px_r.normal_(0.0, 0.5)
        module.decoder.linear.bias.normal_(0.0, 1.0)
        module.decoder.linear.weight.normal_(0.0, 1.0)
    z = torch.randn(32, 3)

    trace = poutine.trace(poutine.condition(module.model, data={"z": z})).get_trace(x, batch)
    trace.compute_log_prob()
    ours = trace.nodes["x"]["log_prob"] * 32  # the model scales log-densities by 1/B

    weight = module.decoder.linear.weight.detach()  # (G, D + n_batch): [W | beta]
    w, beta, b = weight[:, :3], weight[:, 3:].T, module.decoder.linear.bias.detach()
    library = x.sum(-1, keepdim=True)
    mu = torch.softmax(z @ w.T + b + beta[batch], -1) * library
    theta = module.px_r.detach().exp()
    nb = torch.distributions.NegativeBinomial(total_count=theta, logits=torch.log(mu) - torch.log(theta))
    expected = nb.log_prob(x).sum(-1)
    torch.testing.assert_close(ours.detach(), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(module.get_loadings(), w.numpy())


def test_ldvae_refuses_no_components(kang):
    adata = kang.copy()
    VMMLDVAE.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match="n_clusters must be >= 1"):
        VMMLDVAE(adata, n_clusters=0)
