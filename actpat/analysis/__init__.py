"""Analyses of activation maps: pattern similarity, STS correlation, checks of the findings."""
