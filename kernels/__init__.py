"""Triton kernels and fast torch paths for the canonical MoE ops."""
