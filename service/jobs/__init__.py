"""Batch jobs: the job store (SQLite) and the runner that scores them off the event loop."""
