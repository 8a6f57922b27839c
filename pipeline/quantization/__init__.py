"""fmap quantization."""
