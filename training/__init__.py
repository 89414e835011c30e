"""Trains the example models of the default repository from data that ships with scikit-learn."""
