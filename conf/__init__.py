"""Hydra config package (makes `pkg://fabricq.conf` importable for the console script)."""
