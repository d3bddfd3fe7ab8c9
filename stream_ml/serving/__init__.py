"""The HTTP scorer: features from the online store, a micro-batched PyTorch model, a decision."""
