"""Experiments over the pipeline: λ sweeps and the paper reproduction (``deepsim sweep``, ``deepsim reproduce``)."""
