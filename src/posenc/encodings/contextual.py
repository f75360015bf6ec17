"""The contextual family (to be filled in by its issue)."""
