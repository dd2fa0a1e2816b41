"""Thin command-line tools."""
