"""actpat: activation patterns of parameters in language models.

Implements (and extends) Wang et al., "Exploring Activation Patterns of Parameters in
Language Models" (AAAI 2025). See README.md and docs/architecture.md.
"""

__version__ = "0.1.0"
