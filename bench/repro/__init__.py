"""The pieces of bench/reproduce.py (FlexOlmo's central results at small scale): the plans,
the baselines that only the reproduction uses, extraction, and the report."""
