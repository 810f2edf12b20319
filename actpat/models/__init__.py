"""Models: loading a spec into an in-memory causal LM, architecture adapters, memory and offload."""
