"""A micro-batch through the model, into per-sequence log-probs.

- `logps.py`: the log-prob kernels (no [tokens, vocab] logits tensor) and the standard forward,
  chosen and rejected stacked into 2B padded rows;
- `prefix_sharing.py`: one row per pair, the prompt encoded once;
- `packing.py`: padding-free rows, the whole micro-batch as one row of real tokens;
- `attention.py`: the attention that keeps packed sequences apart;
- `strategy.py`: `Forward`, the one choice of path for a run, made from the model and settings.
"""
