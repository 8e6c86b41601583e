"""`gguflm train`: a small LLaMA trained from text files, exported as a GGUF that gguflm and llama.cpp run.

text -> byte-level BPE (bpe.py) -> the engine's Llama over trainable parameters (model.py) -> AdamW
loop with checkpoints (loop.py) -> GGUF (export.py) and a loss-curve PNG (plot.py); run.py ties them
together; config.py holds the settings (light: the CLI imports it).
"""
