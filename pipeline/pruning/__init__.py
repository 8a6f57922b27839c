"""fmap pruning."""
