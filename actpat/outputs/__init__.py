"""Outputs: JSON artifacts, figures and the HTML report."""
