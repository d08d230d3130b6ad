"""Evaluation: scoring folders, reports and figures, frequency analyses, speed grids, the benchmark and the demo."""
