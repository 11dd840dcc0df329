"""Bundled preference datasets (JSONL folders with train/valid/test splits)."""
