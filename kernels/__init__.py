"""Triton kernels for MoE routing and the sparse expert FFN, each beside a PyTorch reference."""
