"""Accuracy evaluations: BFCL v1+v2 single-turn, scored by BFCL's official checker.

The checker (``bfcl-eval``) runs in an environment of its own (checker_env.py);
nothing here imports it.
"""

from .bfcl import CATEGORIES, BfclEntry, evaluate_bfcl, load_entries, parse_categories

__all__ = ["CATEGORIES", "BfclEntry", "evaluate_bfcl", "load_entries", "parse_categories"]
