"""The HTML report: discover artifacts, render sections, assemble one page."""
