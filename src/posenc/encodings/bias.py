"""The bias family (to be filled in by its issue)."""
