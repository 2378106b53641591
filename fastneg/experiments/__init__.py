"""Experiments that reproduce the paper's claims on the embedded dataset (run with python -m)."""
