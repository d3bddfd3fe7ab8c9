"""stream-ml: streaming-first, real-time machine learning for fraud-style scoring."""

__version__ = "0.1.0"
