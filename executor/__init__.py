"""Baton's executor: intake, scheduling, and (later) the liveness machinery. It never runs user code."""
