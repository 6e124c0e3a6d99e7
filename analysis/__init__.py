"""Metrics and plots over any ensemble, MD or generated. Never imports torch (DESIGN.md §1)."""
