"""A stand-in for the one xformers call dilated-attention-pytorch 0.2.0 makes (benchmarks only)."""
