r"""Count likelihoods shared by the models, as Pyro distributions.

:class:`ProteinCounts` is totalVI's protein likelihood (Gayoso et al. 2021): per cell :math:`n` and protein
:math:`t` a two-component negative-binomial mixture of a background and a foreground,

.. math::

    y_{nt} \mid \beta_{nt}, \alpha_{nt}, \pi_{nt}
      \sim \pi_{nt}\, \mathrm{NB}(\beta_{nt}, \phi_t) + (1 - \pi_{nt})\, \mathrm{NB}(\alpha_{nt}\beta_{nt}, \phi_t),

with the NB in its mean / inverse-dispersion form :math:`\mathrm{NB}(y \mid \mu, \phi) = \frac{\Gamma(y + \phi)}
{\Gamma(\phi)\, y!} \big(\tfrac{\phi}{\phi + \mu}\big)^{\phi} \big(\tfrac{\mu}{\phi + \mu}\big)^{y}`, background
rate :math:`\beta_{nt} > 0`, foreground scale :math:`\alpha_{nt} \ge 1`, background probability
:math:`\pi_{nt} = \operatorname{sigmoid}(h_{nt})` and one inverse dispersion :math:`\phi_t` per protein shared by
both components.  The density is scvi-tools' :class:`scvi.distributions.NegativeBinomialMixture` (``mu1`` the
background, ``mixture_logits`` :math:`h`), summed over proteins; this class only gives it Pyro's shapes.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from scvi.distributions import NegativeBinomialMixture
from torch import Tensor

__all__ = ["ProteinCounts"]


class ProteinCounts(dist.TorchDistribution):
    r"""totalVI's background/foreground NB mixture over the ``T`` proteins of each cell (see the module docstring):
    batch shape ``(B,)``, event shape ``(T,)``.

    Parameters are given on the scales the networks produce: ``log_background`` :math:`\log\beta` ``(B, T)``,
    ``foreground_scale`` :math:`\alpha \ge 1` ``(B, T)``, ``log_theta`` :math:`\log\phi` ``(T,)`` and
    ``mixing_logits`` :math:`h` ``(B, T)`` with :math:`\pi = \operatorname{sigmoid}(h)` the background probability."""

    arg_constraints: dict = {}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(
        self,
        log_background: Tensor,
        foreground_scale: Tensor,
        log_theta: Tensor,
        mixing_logits: Tensor,
        validate_args: bool | None = None,
    ) -> None:
        if log_background.dim() != 2:
            raise ValueError(f"log_background must be (cells, proteins), got shape {tuple(log_background.shape)}")
        self.log_background, self.foreground_scale = log_background, foreground_scale
        self.log_theta, self.mixing_logits = log_theta, mixing_logits
        super().__init__(log_background.shape[:1], log_background.shape[1:], validate_args=validate_args)

    def scvi(self) -> NegativeBinomialMixture:
        """The same mixture as scvi-tools' distribution (batch shape ``(B, T)``, no event dimension)."""
        background = torch.exp(self.log_background)
        theta = torch.exp(self.log_theta).expand_as(background)
        return NegativeBinomialMixture(
            mu1=background, mu2=self.foreground_scale * background, theta1=theta, mixture_logits=self.mixing_logits
        )

    def expand(self, batch_shape, _instance=None) -> ProteinCounts:
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        raise NotImplementedError(f"ProteinCounts cannot be expanded from {self.batch_shape} to {batch_shape}")

    @property
    def mean(self) -> Tensor:
        r""":math:`\beta\,(\pi + (1 - \pi)\alpha)`."""
        pi = torch.sigmoid(self.mixing_logits)
        return torch.exp(self.log_background) * (pi + (1.0 - pi) * self.foreground_scale)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.scvi().log_prob(value).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.scvi().sample(torch.Size(sample_shape))
