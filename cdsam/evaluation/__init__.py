"""Scoring checkpoints: per-loader scoring, the split's figures, the class grid, prompt pairs and the
evaluate stage's report (CSV, JSON, overlays)."""
