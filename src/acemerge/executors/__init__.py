"""Executors: where the per-parameter work of a merge runs.

``local`` (the default) merges in this process with reading, merging and writing
overlapped; ``ray`` runs the work as tasks on a Ray cluster (``pip install acemerge[ray]``).
Both hand the engine every parameter's result in plan order, so the output is the same.
``factory.make_executor`` picks one from a merge config.
"""
