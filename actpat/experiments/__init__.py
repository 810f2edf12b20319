"""The paper's experiments and the demo, composed from library functions."""
