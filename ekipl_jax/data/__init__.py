"""Data: synthetic scenes, TFDS builders, the tokenizer/processor folder and prompt batching."""
