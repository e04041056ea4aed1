"""Quantized-weight support: GGUF block dequantization (see `gguf_blocks`)."""
