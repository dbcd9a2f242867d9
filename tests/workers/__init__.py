"""Scripts the multi-process tests launch, and the launcher they share."""
