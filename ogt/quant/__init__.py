"""Quantization: target profiles, QDQ insertion, the quantize pipeline and its report."""
