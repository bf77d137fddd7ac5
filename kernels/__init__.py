"""Kernel generators, each beside its dense numpy reference (installed as `sparsejit.kernels`)."""
