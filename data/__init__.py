# Data: data/<name>/prepare.py writes token files (see data/oasst1/prepare.py), data/batching.py batches them.
