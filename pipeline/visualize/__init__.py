"""fmap visualize."""
