"""Relative error measures the FP8 tests compare against their float64 references."""
import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max-norm relative error of a against reference b."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def frob(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius-norm relative error of a against reference b."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
