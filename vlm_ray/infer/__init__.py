"""Batch inference: model loading, batched generation, and the pool of Ray actors that runs it."""
