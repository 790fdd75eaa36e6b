"""The model side of a run: loading, what trains, backends, the reference, generation.

- `loading.py`: base model and tokenizer, and the device settings ("auto" dtype, 4-bit, ...);
- `adapters.py`: a fresh LoRA adapter, a starting (SFT) adapter, or full fine-tuning;
- `backends.py`: Accelerate's backends (DDP, FSDP2, DeepSpeed), on machines with or without GPUs;
- `reference.py`: which network is the DPO reference (the adapter switched off, ...);
- `generation.py`: replies cut from the output by token ids.
"""
