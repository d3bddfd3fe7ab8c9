"""Watching the loop: online/offline consistency (and, with the feedback loop, drift)."""
