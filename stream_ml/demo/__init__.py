"""The demo: the whole loop (stack, workers, scorer, a payment gateway, retraining) in one command."""
