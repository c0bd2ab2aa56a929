"""The paper in miniature: each experiment lists its training runs and writes its tables and figures.

    lorakit experiment NAME [--quick] [--out DIR]       (or: make experiments)
"""

from experiments import glue_mini, lr_sweep, ner, rank, subspace, targets

EXPERIMENTS = {m.EXPERIMENT.name: m.EXPERIMENT for m in (lr_sweep, glue_mini, rank, targets, ner, subspace)}
