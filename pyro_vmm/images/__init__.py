"""Image clustering with the VampPrior Mixture Model (the paper's image experiments).

Modules: :mod:`~pyro_vmm.images.training` (the training loop of the image models, VaDE's recipe),
:mod:`~pyro_vmm.images.evaluation` (latents, responsibilities, clustering scores),
:mod:`~pyro_vmm.images.surgery` (ELBO surgery, paper Table 1) and :mod:`~pyro_vmm.images.experiment` (presets, split,
fit-and-score and figures behind ``pyro-vmm images`` and ``benchmarks/images_clustering.py``).
"""
