"""Matmul kernels (W4A16 Triton/CPU paths, each with a pure-torch reference twin). Empty until issue #4."""
