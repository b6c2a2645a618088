"""Low-level ops the denoisers call.

- `kiln.kernels.attention`: the attention dispatch (PyTorch SDPA by default; xformers and flash-attn on CUDA when
  installed), installed on a denoiser as diffusers attention processors, each kernel with a plain-torch
  reference and a parity test (tests/unit/test_kernels.py).

No fused ops: none has been measured to help. On the CPU machines Kiln is developed on there is no kernel
toolchain to measure one with (Triton runs on CPU only in its interpreter), the `compile` backend already fuses
the elementwise chains (norms, activations, residual adds) that a hand-written kernel would, and on GPUs SDPA's
flash/efficient kernels and TensorRT cover attention. A fused op belongs here only with a GPU measurement
showing a gain over those.
"""
