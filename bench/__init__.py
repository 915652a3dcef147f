"""Benchmarks of the gateway against OpenSSH (``python -m bench``); not part of the test suite."""
