"""Run several training configs one after another in one torchrun launch (one process group):
`torchrun ... tests/dist_driver.py RUNS.json`, where RUNS.json lists TrainConfig dicts with an
optional "resume" flag. Process start-up dominates tiny runs; this pays it once."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from llmkit.train.encoder import EncoderTrainer
from llmkit.train.losses import ENCODER_OBJECTIVES
from llmkit.train.trainer import Trainer, TrainConfig


def main() -> None:
    dist.init_process_group("gloo")  # the trainers join it and leave it open for the next run
    for run in json.loads(Path(sys.argv[1]).read_text()):
        resume = run.pop("resume", False)
        config = TrainConfig(**run)
        trainer = EncoderTrainer if config.objective in ENCODER_OBJECTIVES else Trainer
        trainer(config, resume=resume).fit()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
