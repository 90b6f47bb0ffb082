"""Training: a thin transformers.Trainer subclass fed by pure data functions."""
