"""Figures of evaluation results, drawn with Pillow only (no plotting library is a dependency)."""
