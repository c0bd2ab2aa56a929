"""Run by test_distributed.py under torchrun: train from a config file, then write this rank's trained
tensors (rank<N>.safetensors) and which parameters DDP synchronises (rank<N>.json) into the run directory."""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from lorakit.train import distributed
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from lorakit.train.methods import trainable_state


def main(config_path: str) -> None:
    config = TrainConfig.load(config_path)
    ctx = distributed.init(config.device)  # joins torchrun's group; train() reuses it and leaves it open
    result = train(config)
    out = Path(config.out)
    save_file(trainable_state(result.model), str(out / f"rank{ctx.rank}.safetensors"))
    net = distributed.wrap(result.model, ctx)
    facts = {"world": ctx.world, "synced": distributed.synced_parameters(net),
             "trainable": [n for n, p in result.model.named_parameters() if p.requires_grad],
             "frozen_grads": [n for n, p in result.model.named_parameters()
                              if not p.requires_grad and p.grad is not None]}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(facts))
    distributed.close(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
