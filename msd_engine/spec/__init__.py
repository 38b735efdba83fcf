"""Speculative decoding: EAGLE-2 draft trees (tree.py) and their verification (accept.py)."""
