"""Example actions, loaded by the demo and the development and docker configs."""
