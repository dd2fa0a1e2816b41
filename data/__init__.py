"""Datasets, list handling and the toy-dataset generator."""
