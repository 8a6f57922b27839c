"""fmap export."""
