"""Executors: where the per-parameter work of a merge runs.

``local`` (the default) merges in this process with reading, merging and writing
overlapped; it hands the engine every parameter's result in plan order.
"""
