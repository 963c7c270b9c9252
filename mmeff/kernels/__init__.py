"""Attention kernels: each op has a naive torch twin (ground truth, CPU path) and a Triton kernel."""
