"""One file per fused op: its Triton kernels and launch wrappers."""
