"""The paper in miniature: each experiment lists its training runs and writes its tables and figures.

    lorakit experiment NAME [--quick] [--out DIR]       (or: make experiments, make experiments-e2e)
"""

from experiments import e2e, glue_mini, lr_sweep, ner, parity, rank, subspace, targets

EXPERIMENTS = {e.name: e for e in (lr_sweep.EXPERIMENT, glue_mini.EXPERIMENT, rank.EXPERIMENT, targets.EXPERIMENT,
                                   ner.EXPERIMENT, subspace.EXPERIMENT, parity.EXPERIMENT, e2e.RANK,
                                   e2e.METHODS_EXPERIMENT)}
