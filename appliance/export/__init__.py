"""Export stages: HF checkpoint to GGUF with llama.cpp's converter, quantize by quality, and the parity check every exported file passes."""
