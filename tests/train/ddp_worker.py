"""Run by test_distributed.py under torchrun: train from a config file, then write this rank's trained
tensors (rank<N>.safetensors), which parameters DDP synchronises and the seeds of the LoRA dropout masks it
drew (rank<N>.json) into the run directory."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

import lorakit.functional as functional
from lorakit.train import distributed
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from lorakit.train.methods import trainable_state


def main(config_path: str) -> None:
    config = TrainConfig.load(config_path)
    ctx = distributed.init(config.device)  # joins torchrun's group; train() reuses it and leaves it open
    mask_seeds, keep_mask = [], functional.dropout_keep_mask

    def recording_keep_mask(seed, *args, **kwargs):  # the lean LoRA path draws every dropout mask here
        mask_seeds.append(seed)
        return keep_mask(seed, *args, **kwargs)

    functional.dropout_keep_mask = recording_keep_mask
    result = train(config)
    out = Path(config.out)
    save_file(trainable_state(result.model), str(out / f"rank{ctx.rank}.safetensors"))
    net = distributed.wrap(result.model, ctx)
    facts = {"world": ctx.world, "synced": distributed.synced_parameters(net),
             "trainable": [n for n, p in result.model.named_parameters() if p.requires_grad],
             "frozen_grads": [n for n, p in result.model.named_parameters()
                              if not p.requires_grad and p.grad is not None],
             "mask_seeds": mask_seeds}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(facts))
    distributed.close(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
