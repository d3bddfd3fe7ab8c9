"""The feedback loop: labels joined with predictions, online learning and drift."""
