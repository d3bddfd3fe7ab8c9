"""Faust topologies, one module per `stream-ml worker NAME`: they wire pieces of `stream_ml` and
hold no logic of their own. The feature and feedback topologies land with their stations."""
