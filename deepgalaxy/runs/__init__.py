"""Runs: train, scale and tune, launched through launcher plugins and tracked in MLflow."""
