"""Networks and losses (pure PyTorch)."""
