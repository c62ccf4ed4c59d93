"""Pieces shared by the count models (:mod:`~pyro_vmm.models.scvi`, :mod:`~pyro_vmm.models.totalvi`): the scvi-tools
glue of a Pyro module, the Gaussian encoder's networks and the check of the initial pseudo-inputs.

No generative story lives here: each model's ``model``/``guide`` stays in its own file.
"""

from __future__ import annotations

import pyro
import torch
from scvi import REGISTRY_KEYS
from scvi.module.base import PyroBaseModuleClass
from scvi.nn import FCLayers
from torch import Tensor, nn

__all__ = ["DECODER_NORM", "NONZERO_KEY", "CountsModule", "check_choice", "check_pseudo_inputs", "gaussian_encoder"]

#: minibatch key of the ``(2, nnz)`` row / column positions of the non-zero counts (row-major order)
NONZERO_KEY = "nonzero"
#: the normalisation of scvi-tools' count decoders at SCVI's and TOTALVI's defaults (batch norm, no layer norm,
#: softmax expression frequencies)
DECODER_NORM = {"use_batch_norm": True, "use_layer_norm": False, "scale_activation": "softmax"}


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be {' or '.join(repr(c) for c in choices)}, got {value!r}")


def gaussian_encoder(
    n_in: int,
    n_hidden: int,
    n_latent: int,
    n_layers: int,
    dropout_rate: float,
    n_cat_list: list[int] | None = None,
    inject_covariates: bool = True,
) -> tuple[FCLayers, nn.Linear, nn.Linear]:
    """``FCLayers`` (batch norm, no layer norm) and the mean / variance heads of ``q(z | .)``, as ``scvi.nn.Encoder``
    builds them (created in that order, so a seed gives the same initial weights)."""
    body = FCLayers(
        n_in=n_in,
        n_out=n_hidden,
        n_cat_list=n_cat_list,
        n_layers=n_layers,
        n_hidden=n_hidden,
        dropout_rate=dropout_rate,
        use_batch_norm=True,
        use_layer_norm=False,
        inject_covariates=inject_covariates,
    )
    return body, nn.Linear(n_hidden, n_latent), nn.Linear(n_hidden, n_latent)


def check_pseudo_inputs(
    prior: str, pseudo_inputs: Tensor | None, shape: tuple[int, int], columns: str, hint: str
) -> Tensor | None:
    """The initial pseudo-input counts as a tensor of ``shape`` ``(K, width)`` for ``vmm``/``vampprior`` (``None``
    for the other priors); ``columns`` names the width in the error, ``hint`` says what to pass when missing."""
    if prior.lower() not in ("vmm", "vampprior"):
        return None
    if pseudo_inputs is None:
        raise ValueError(f"prior={prior!r} needs pseudo_inputs: {hint}")
    pseudo_inputs = torch.as_tensor(pseudo_inputs)
    if pseudo_inputs.shape != shape:
        raise ValueError(
            f"pseudo_inputs has shape {tuple(pseudo_inputs.shape)}, expected (n_clusters, {columns}) = {shape}"
        )
    return pseudo_inputs


class CountsModule(PyroBaseModuleClass):
    r"""scvi-tools glue shared by the count models: the device, ``on_load``, the minibatch's non-zero positions and
    :math:`q(c \mid z)` under a cell's posterior."""

    #: True for a query model (:mod:`pyro_vmm.scvi._query`): the prior stays as the reference left it, no EM step
    frozen_prior: bool = False

    @staticmethod
    def _batch_args(tensor_dict: dict[str, Tensor], kwargs: dict) -> tuple[tuple[Tensor, Tensor], dict]:
        """``(x, batch_index), kwargs`` plus ``"nonzero": (rows, cols)`` when the loader gives the non-zero positions
        of ``x`` (:class:`~pyro_vmm.scvi._data.CountsDataset`, key ``"nonzero"``, shape ``(2, nnz)``)."""
        nonzero = tensor_dict.get(NONZERO_KEY)
        if nonzero is not None:
            kwargs["nonzero"] = (nonzero[0], nonzero[1])
        return (tensor_dict[REGISTRY_KEYS.X_KEY], tensor_dict[REGISTRY_KEYS.BATCH_KEY]), kwargs

    @property
    def device(self) -> torch.device:
        return self.px_r.device

    def on_load(self, model, **kwargs) -> None:
        """Nothing to materialise: every parameter is in ``state_dict`` (no training step, unlike scvi-tools)."""
        pyro.clear_param_store()

    def _posterior_cluster_probs(
        self, q: torch.distributions.Distribution, give_mean: bool, mc_samples: int, rows_per_pass: int = 16384
    ) -> Tensor:
        r""":math:`q(c \mid z)`, ``(B, K)``, at the mean of the posterior ``q`` (batch ``(B,)``, event ``(D,)``) when
        ``give_mean``, else averaged over ``mc_samples`` draws :math:`z \sim q`, ``rows_per_pass`` cell-draws at a
        time."""
        if give_mean:
            return self.prior.cluster_probs(q.mean, self.pseudo_posterior)
        if int(mc_samples) < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        b, d = q.mean.shape
        per_pass = max(1, rows_per_pass // max(b, 1))
        total = 0.0
        for start in range(0, int(mc_samples), per_pass):
            s = min(per_pass, int(mc_samples) - start)
            z = q.sample((s,)).reshape(s * b, d)
            total = total + self.prior.cluster_probs(z, self.pseudo_posterior).reshape(s, b, -1).sum(0)
        return total / int(mc_samples)
