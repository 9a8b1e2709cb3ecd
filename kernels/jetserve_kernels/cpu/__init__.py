"""C++ kernels for the CPU path (paged attention, KV write, fused RMSNorm and rotary)."""
