"""Data: load any supported file into Conversations, render them into Examples, pack Batches."""
