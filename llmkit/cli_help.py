"""Help texts of the `llmkit` command: one example per command, the training settings and presets.

Plain strings, so `llmkit --help` does not import torch to print them; tests/test_cli_help.py
checks them against TrainConfig and the preset tables, so they cannot drift.
"""
from __future__ import annotations

EXAMPLES = {
    "demo": "llmkit demo --out runs/demo --max-steps 200",
    "train": "llmkit train --data data/shakespeare --out runs/char --preset char-tiny --max-steps 500 lr=3e-3",
    "eval": "llmkit eval --model runs/char --text notes.txt --json",
    "generate": "llmkit generate 'To be' --model smollm2-135m-instruct --max-new-tokens 40 --temperature 0",
    "chat": "llmkit chat --model smollm2-135m-instruct --system 'Answer briefly.'",
    "convert": "llmkit convert smollm2-135m-instruct runs/smollm2-hf --to hf",
    "prepare": "llmkit prepare tinyshakespeare.txt --out data/shakespeare --tokenizer char",
    "serve": "llmkit serve --model runs/char --name shakespeare --port 8000",
    "distill": "llmkit distill --teacher runs/char --student char-tiny --data data/shakespeare --out runs/student",
    "plot": "llmkit plot runs/char --out loss.png",
    "attention": "llmkit attention 'The cat sat' --model smollm2-135m-instruct --layers -1 --out attention.png",
    "embed": "llmkit embed sentences.txt --out sentences.npy",
    "finetune": "llmkit finetune reviews.jsonl --task classify --model all-minilm-l6-v2 --out runs/sentiment",
    "predict": "llmkit predict reviews.jsonl --model runs/sentiment --out predictions.jsonl",
    "dialog": "llmkit dialog examples/booking_domain.yaml --nlu runs/booking-nlu",
    "index": "llmkit index docs/ --out runs/docs-index",
    "ask": "llmkit ask 'How do I resume training?' --index runs/docs-index -k 4",
    "prune": "llmkit prune runs/char --out runs/char-sparse --sparsity 0.5",
    "quantize": "llmkit quantize smollm2-135m-instruct --to q8_0 --out runs/smollm2-q8 --text notes.txt",
}

DECODER_PRESETS = ("char-tiny", "gpt2-124m", "llama-tiny", "transformer-tiny", "smollm2-135m")
ENCODER_PRESETS = ("bert-tiny", "bert-mini", "minilm-l6", "bert-base")

# KEY=VALUE settings of `llmkit train` (TrainConfig) with their defaults
TRAIN_SETTINGS = (
    "data_dir=data, out_dir=runs/train, preset=char-tiny, batch_size=12, block_size=64, grad_accum=1, "
    "max_steps=2000, lr=0.001, min_lr=0.0001, warmup_steps=max_steps/20, lr_decay_steps=max_steps, "
    "weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0, dtype=float32, device=auto, compile=false, "
    "eval_interval=250, eval_iters=20, log_interval=10, ckpt_interval=1000, seed=1337, tensorboard=false, "
    "objective=causal, peak_flops=measured, threads=torch's default, progress=true, strategy=ddp, "
    "activation_checkpointing=false, fsdp_unit_mb=16.0, init_from=none, overwrite=false, lr_schedule=cosine, "
    "label_smoothing=0.0; "
    "model.NAME=VALUE overrides the preset's model settings (model.n_layer=6, model.dropout=0.1, ...)"
)


def epilog(command: str) -> str:
    text = f"Example: {EXAMPLES[command]}"
    if command == "train":
        text = f"Settings (KEY=VALUE, defaults): {TRAIN_SETTINGS}\n\n{text}"
    return text
