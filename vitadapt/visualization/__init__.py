"""Figures of evaluation results, drawn with matplotlib: run trade-offs and histograms (plots), DVT curves (curves)."""
