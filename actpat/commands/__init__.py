"""One module per command; see actpat.cli."""
