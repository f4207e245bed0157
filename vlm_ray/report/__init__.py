"""The evaluation report: PNG plots (plots.py) and report.md (markdown.py)."""
