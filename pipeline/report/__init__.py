"""fmap report."""
