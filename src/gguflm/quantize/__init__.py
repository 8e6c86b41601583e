"""`gguflm quantize` and `gguflm imatrix`: llama-quantize and llama-imatrix, in torch."""
