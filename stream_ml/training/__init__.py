"""Offline training: the replayed dataset format, ranking metrics, and `stream-ml train`."""
