"""Data: dataset registry, local-first loading, seeded sampling, calibration windows."""
