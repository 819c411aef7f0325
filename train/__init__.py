"""Trainer: LoRA SFT (MRSI) and GRPO (CVO) on the pipeline's shards."""
