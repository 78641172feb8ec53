"""Triton kernels for the MoE layer's hot paths, each with a plain torch reference (filled by the layer issue)."""
