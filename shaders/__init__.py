"""The WGSL kernels, shipped in the distribution as package data (hpi.shaders)."""
