"""Converters: Hugging Face / GGUF checkpoints in, PEFT adapters and fused models out."""
