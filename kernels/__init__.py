"""pcpc.kernels: Triton kernels for sparse updates and their torch references."""
