"""Curated kernelspecs: the spec.yaml model, validation and rendering into EG kernelspecs."""

from .spec import KernelSpec, Resources, load_kernelspec, load_kernelspecs

__all__ = ["KernelSpec", "Resources", "load_kernelspec", "load_kernelspecs"]
