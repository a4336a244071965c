"""n2n_core: a from-scratch neural-network framework on torch tensor operations.

Modules have explicit `forward` and `backward`; parameters carry their gradients;
nothing here uses torch.nn (other than `functional.unfold`/`fold`) or autograd.
"""
from n2n_core.module import Module, Parameter, Sequential

__all__ = ["Module", "Parameter", "Sequential"]
