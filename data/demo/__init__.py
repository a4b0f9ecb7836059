"""The built-in demo dataset: rendered scenes, real photos and real speech for every task.

``omnidiff demo-data OUT_DIR`` (see :mod:`omnidiff.data.demo.build`) writes WebDataset shards per
task plus ``mixture.yaml`` with the three curriculum stages' ratios.
"""
