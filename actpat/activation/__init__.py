"""Activation: the metric |W * df/dW|, profiles of mean maps, and the machinery of long profiling runs."""
