"""Generative models of pyro-vmm as Pyro ``model``/``guide`` programs (installed as ``pyro_vmm.models``).

Each file is one model with its generative story in the docstring; edit them freely.
"""
