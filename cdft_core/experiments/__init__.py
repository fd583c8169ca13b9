"""Experiments made of runs: cross-validation over a protocol's rotations (``cdft cv``) and grids of them (``cdft grid``)."""
