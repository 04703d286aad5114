"""Evaluation: the metric tables of both source papers, and their baselines."""
