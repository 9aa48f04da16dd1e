"""Run several training configs one after another in one torchrun launch (one process group):
`torchrun ... tests/dist_driver.py RUNS.json`, where RUNS.json lists TrainConfig dicts with an
optional "resume" flag, for SFT "sft": {"model": DIR, "lora": {LoRAConfig fields} or null}, and for
fault injection "die": {"rank": R, "step": N} (rank R dies halfway through writing step N's shard).
Process start-up dominates tiny runs; this pays it once."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from llmkit.io import sharded, snapshots
from llmkit.model.lora import LoRAConfig
from llmkit.train.encoder import EncoderTrainer
from llmkit.train.losses import ENCODER_OBJECTIVES
from llmkit.train.seq2seq import Seq2SeqTrainer
from llmkit.train.sft import SFTTrainer
from llmkit.train.trainer import Trainer, TrainConfig


def die_during_save(step: int) -> None:
    """This rank writes a piece of its shard of `step` and exits at once, as a killed process would
    (no exception, no cleanup); the other ranks wait in the collective save until torchrun stops them."""
    real = sharded.save

    def save(directory, *args, **kwargs):
        if Path(directory).parent.name == snapshots.step_name(step) + ".tmp":
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / f"__{dist.get_rank()}_0.distcp").write_bytes(b"half a shard")
            os._exit(17)
        return real(directory, *args, **kwargs)

    sharded.save = save


def trainer_for(run: dict):
    resume, sft, die = run.pop("resume", False), run.pop("sft", None), run.pop("die", None)
    if die is not None and die["rank"] == dist.get_rank():
        die_during_save(die["step"])
    config = TrainConfig(**run)
    if sft is not None:
        lora = LoRAConfig(**sft["lora"]) if sft.get("lora") else None
        return SFTTrainer(config, model=sft["model"], lora=lora, resume=resume, log=lambda *_: None)
    if config.objective == "seq2seq":
        return Seq2SeqTrainer(config, resume=resume)
    return (EncoderTrainer if config.objective in ENCODER_OBJECTIVES else Trainer)(config, resume=resume)


def main() -> None:
    dist.init_process_group("gloo")  # the trainers join it and leave it open for the next run
    for run in json.loads(Path(sys.argv[1]).read_text()):
        trainer_for(run).fit()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
