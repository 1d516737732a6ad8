"""Evolutionary search under a latency budget, and its reports."""
