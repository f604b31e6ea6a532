"""ddpm_fast.kernels: the fused Triton ops (imported as ddpm_fast.kernels, never `kernels`)."""
