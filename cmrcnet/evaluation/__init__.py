"""Scoring of predicted expression against the truth (both protocols), summaries, statistics and tables."""
