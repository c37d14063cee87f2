"""Foundations every layer may use: errors and exit codes, collectives, build-once caches, the run-dir contract."""
