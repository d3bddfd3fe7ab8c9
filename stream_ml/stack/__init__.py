"""The embedded local stack (Kafka-compatible broker + Redis) and how commands find it."""

from stream_ml.stack.state import NotConfigured, kafka_bootstrap, redis_url

__all__ = ["NotConfigured", "kafka_bootstrap", "redis_url"]
