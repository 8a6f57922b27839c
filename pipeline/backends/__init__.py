"""fmap backends."""
