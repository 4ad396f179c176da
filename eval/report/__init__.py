"""Reporting: run folders (results, analysis, summary, plots), caveats, the scaling chart, the
HTML / markdown report and run comparison. Imports neither torch nor the run orchestration."""
