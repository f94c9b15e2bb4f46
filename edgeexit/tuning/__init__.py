"""Threshold tuning on a recorded trace, and switching a running Runner between operating points."""
