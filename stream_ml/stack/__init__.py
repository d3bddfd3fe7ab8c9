"""The embedded local stack (Kafka-compatible broker + Redis) and how commands find it."""

from stream_ml.stack.state import NotConfigured, connect_redis, kafka_bootstrap, redis_url

__all__ = ["NotConfigured", "connect_redis", "kafka_bootstrap", "redis_url"]
