"""The rotary family (to be filled in by its issue)."""
