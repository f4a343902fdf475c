"""Evaluation: pure functions from records to metrics, findings and verdicts. No I/O, no driver."""
