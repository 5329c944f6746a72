"""Evaluation: metrics and protocols for the attribute and re-ID models."""
