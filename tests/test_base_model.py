r"""``PyroVMMModel`` is generic: a second Pyro module, unrelated to scVI, gets training, save/load, latents and clusters
from a 20-line subclass.

The toy model: :math:`z_n \sim p(z)` (a GMM prior, K = 3), :math:`x_{ng} \sim \mathrm{Poisson}(\ell_n
\operatorname{softmax}(W z_n + b_{s_n})_g)` with the library size :math:`\ell_n` a registered ``adata.obs`` column,
:math:`q(z \mid x) = \mathcal N(\mathrm{Linear}(\log(1 + x)))`.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from scvi import REGISTRY_KEYS
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField, LayerField, NumericalObsField
from scvi.module.base import PyroBaseModuleClass
from torch import nn

from pyro_vmm import PyroVMMModel
from pyro_vmm.priors import build_prior
from pyro_vmm.utils import eval_mode

LIBRARY_KEY = REGISTRY_KEYS.SIZE_FACTOR_KEY


class PoissonModule(PyroBaseModuleClass):
    """A linear-decoder Poisson VAE with a pluggable prior: the module contract of ``PyroVMMModel``."""

    frozen_prior = False

    def __init__(self, n_input: int, n_batch: int, n_latent: int = 2, prior: str = "gmm", n_clusters: int = 3):
        super().__init__()
        self.encoder = nn.Linear(n_input, 2 * n_latent)
        self.decoder = nn.Linear(n_latent, n_input)
        self.batch_bias = nn.Parameter(torch.zeros(n_batch, n_input))
        self.prior = build_prior(prior, n_latent, n_components=n_clusters)

    @property
    def device(self) -> torch.device:
        return self.batch_bias.device

    @staticmethod
    def _get_fn_args_from_batch(batch: dict) -> tuple[tuple, dict]:
        return (batch[REGISTRY_KEYS.X_KEY], batch[REGISTRY_KEYS.BATCH_KEY]), {"library": batch[LIBRARY_KEY]}

    def on_load(self, model, **kwargs) -> None:
        pyro.clear_param_store()

    def _q(self, x, batch_index=None, **fields):
        loc, raw = self.encoder(torch.log1p(x)).chunk(2, -1)
        return dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1)

    def model(self, x, batch_index, library):
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=1.0 / x.shape[0]):
            z = pyro.sample("z", self.prior.latent_dist(None))
            logits = self.decoder(z) + self.batch_bias[batch_index.reshape(-1).long()]
            rate = library.reshape(-1, 1) * torch.softmax(logits, -1)
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)

    def guide(self, x, batch_index, library):
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=1.0 / x.shape[0]):
            pyro.sample("z", self._q(x))

    @torch.no_grad()
    def latent_mean(self, x, batch_index, **fields):
        with eval_mode(self):
            return self._q(x).mean

    @torch.no_grad()
    def cluster_probs(self, x, batch_index, give_mean=True, mc_samples=100, **fields):
        return self.prior.cluster_probs(self.latent_mean(x, batch_index), None)


class PoissonVMM(PyroVMMModel):
    """The thin model class: AnnData fields, the extra minibatch field, the module."""

    _module_cls = PoissonModule
    _data_fields = {LIBRARY_KEY: "library"}

    @classmethod
    def setup_anndata(cls, adata, batch_key: str | None = None, library_key: str = "library", **kwargs) -> None:
        args = cls._get_setup_method_args(**locals())
        fields = [
            LayerField(REGISTRY_KEYS.X_KEY, None, is_count_data=True),
            CategoricalObsField(REGISTRY_KEYS.BATCH_KEY, batch_key),
            NumericalObsField(LIBRARY_KEY, library_key),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=args)
        manager.register_fields(adata, **kwargs)
        cls.register_manager(manager)

    def __init__(self, adata, n_latent: int = 2, n_clusters: int = 3, seed: int = 0) -> None:
        super().__init__(adata)
        torch.manual_seed(seed)
        self.module = self._module_cls(self.summary_stats.n_vars, self.summary_stats.n_batch, n_latent, "gmm",
                                       n_clusters)
        self.init_params_ = self._get_init_params(locals())


@pytest.fixture
def toy_adata() -> anndata.AnnData:
    rng = np.random.default_rng(0)
    n, g = 120, 30
    profiles = rng.dirichlet(np.ones(g), size=3)
    kind = rng.integers(0, 3, size=n)
    x = rng.poisson(200 * profiles[kind]).astype(np.float32)
    obs = pd.DataFrame({"batch": pd.Categorical(rng.choice(["a", "b"], size=n)), "library": x.sum(1)},
                       index=[f"c{i}" for i in range(n)])
    return anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(g)]))


def test_a_second_pyro_module_trains_saves_and_loads_on_the_base(toy_adata, tmp_path):
    PoissonVMM.setup_anndata(toy_adata, batch_key="batch")
    model = PoissonVMM(toy_adata)
    model.train(max_epochs=2, batch_size=32, seed=0, enable_progress_bar=False)
    assert model.is_trained and len(model.history["elbo_train"]) == 2
    assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
    latent = model.get_latent_representation()
    assert latent.shape == (toy_adata.n_obs, 2)
    assert model.get_cluster_probabilities().shape == (toy_adata.n_obs, 3)
    assert model.get_cluster_assignments().shape == (toy_adata.n_obs,)

    model.save(tmp_path / "toy", overwrite=True)
    loaded = PoissonVMM.load(tmp_path / "toy", adata=toy_adata)
    np.testing.assert_allclose(loaded.get_latent_representation(), latent, rtol=0, atol=0)
    np.testing.assert_array_equal(loaded.get_cluster_assignments(all_components=True),
                                  model.get_cluster_assignments(all_components=True))
