"""Figures (PNG) for runs: training curves and each task's plots."""
