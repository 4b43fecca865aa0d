"""tether: fine-tune a pre-trained language model on a small dataset without overfitting or forgetting."""

__version__ = "0.1.0"
