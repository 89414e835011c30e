"""Prediction: routing a request to its model version, batching, signature checks."""
