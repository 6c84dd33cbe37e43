"""The system on one machine without AWS or Spring, for the demo and the tests. Never imported by product code."""
