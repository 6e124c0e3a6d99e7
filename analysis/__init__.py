"""Metrics, plots and report text over any ensemble, MD or generated, from plain numpy arrays.

analysis/ owns the definitions of docs/design.md §5: geometry (dihedrals, chirality), the
metrics by subject (weights, histograms, timeseries, summary; all importable from
analysis.metrics), the figures (plots, matplotlib imported lazily) and the text of metrics.json
and report.md (report), which the caller writes. It never imports torch nor p4bg, so the same
code scores MD and any model.
"""
