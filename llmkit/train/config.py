"""Training configuration: one dataclass, loaded from YAML with `key=value` overrides.

Every value is typed by its dataclass field, so `lr=3e-4` becomes a float and
`compile=yes` a bool; unknown keys and values of the wrong type are user errors.
Model settings live under `model:` (YAML) or `model.NAME=VALUE` (command line)
and override the chosen preset.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmkit.model.config import PRESETS, ModelConfig
from llmkit.errors import LlmkitError
from llmkit.model.encoder import ENCODER_PRESETS, EncoderConfig
from llmkit.model.seq2seq import SEQ2SEQ_PRESETS, Seq2SeqConfig
from llmkit.train.losses import ENCODER_OBJECTIVES
from llmkit.utils import TYPE_NAMES, check_device, check_field_types, check_range


@dataclass
class TrainConfig:
    data_dir: str = "data"             # output of `llmkit prepare`: train.bin, val.bin, meta.json, tokenizer.json
    out_dir: str = "runs/train"        # model dir (config.json, model.safetensors, tokenizer.json) + train_state.pt
    preset: str = "char-tiny"          # llmkit.model.config.PRESETS name
    model: dict = field(default_factory=dict)  # ModelConfig overrides on top of the preset
    batch_size: int = 12               # sequences per micro-step, summed over all ranks
    block_size: int = 64               # training context length
    grad_accum: int = 1                # micro-steps per optimizer step
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int | None = None    # None: max_steps // 20 (100 for the default 2000 steps)
    lr_decay_steps: int | None = None  # cosine reaches min_lr here and stays there; None: max_steps
    lr_schedule: str = "cosine"        # cosine | inverse_sqrt (Vaswani et al.: warmup, then lr * sqrt(warmup / step))
                                       # | linear (BERT fine-tuning: warmup, then linear decay to 0 at lr_decay_steps)
    label_smoothing: float = 0.0       # seq2seq: the paper uses 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0             # 0 disables clipping
    dtype: str = "float32"             # float32 | bfloat16 | float16 (float16 needs CUDA)
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    compile: bool = False              # torch.compile the model
    eval_interval: int = 250           # 0 disables periodic validation
    eval_iters: int = 20
    log_interval: int = 10
    ckpt_interval: int = 1000          # 0: checkpoint only at the end
    seed: int = 1337
    tensorboard: bool = False
    objective: str = "causal"          # key of llmkit.train.losses.OBJECTIVES
    peak_flops: float | None = None    # FLOP/s for MFU; None measures a matmul once per process
    threads: int | None = None         # torch.set_num_threads on CPU; None keeps torch's default
    progress: bool = True              # tqdm bar on stderr (rank 0 only)
    strategy: str = "ddp"              # ddp | fsdp (FSDP2: sharded parameters, gradients, optimizer, checkpoints)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    fsdp_unit_mb: float = 16.0         # strategy=fsdp: consecutive blocks grouped into units of >= this many MB
                                       # of parameters (0: one unit per block); see README's FSDP section
    init_from: str | None = None       # start from this model's weights and config (continued pretraining)
    overwrite: bool = False            # train into an out_dir that already holds a checkpoint, replacing it

    def __post_init__(self):
        check_field_types(self, "training config")
        # The schedule follows the run's length unless set: a 100-step run is not all warmup.
        if self.warmup_steps is None:
            self.warmup_steps = self.max_steps // 20
        if self.lr_decay_steps is None:
            self.lr_decay_steps = self.max_steps
        checks = [
            (self.dtype in ("float32", "bfloat16", "float16"), f"dtype {self.dtype!r} (float32, bfloat16, float16)"),
            (self.preset in PRESETS or self.preset in ENCODER_PRESETS or self.preset in SEQ2SEQ_PRESETS,
             f"preset {self.preset!r}; choose from {', '.join([*PRESETS, *ENCODER_PRESETS, *SEQ2SEQ_PRESETS])}"),
            (self.lr_schedule in ("cosine", "inverse_sqrt", "linear"),
             f"lr_schedule {self.lr_schedule!r} (cosine, inverse_sqrt, linear)"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (min(self.batch_size, self.block_size, self.grad_accum) > 0,
             "batch_size, block_size and grad_accum must be positive"),
            (self.max_steps >= 0 and self.warmup_steps >= 0, "max_steps and warmup_steps must be >= 0"),
            (min(self.eval_interval, self.log_interval, self.ckpt_interval) >= 0, "intervals must be >= 0"),
            (self.eval_iters > 0, "eval_iters must be positive"),
            (self.strategy in ("ddp", "fsdp"), f"strategy {self.strategy!r} (ddp, fsdp)"),
            (0 <= self.min_lr <= self.lr, f"need 0 <= min_lr <= lr, got min_lr={self.min_lr} lr={self.lr}"),
        ]
        for ok, what in checks:
            if not ok:
                raise LlmkitError(f"bad training config: {what}")
        self._check_ranges()
        model_class = EncoderConfig if self.objective in ENCODER_OBJECTIVES else ModelConfig
        if self.objective == "seq2seq":
            model_class = Seq2SeqConfig
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(model_class)})
        if unknown:
            raise LlmkitError(f"unknown model config keys: {', '.join(unknown)}")

    def _check_ranges(self) -> None:
        for name in ("weight_decay", "grad_clip", "min_lr"):
            check_range(name, getattr(self, name), 0)
        check_range("lr", self.lr, 0, low_open=True)
        check_range("fsdp_unit_mb", self.fsdp_unit_mb, 0)
        check_range("beta1", self.beta1, 0, 1, high_open=True)
        check_range("beta2", self.beta2, 0, 1, high_open=True)
        if self.threads is not None:
            check_range("threads", self.threads, 1, integer=True)
        if self.peak_flops is not None:
            check_range("peak_flops", self.peak_flops, 0, low_open=True)
        check_range("lr_decay_steps", self.lr_decay_steps, 0, integer=True)
        device, _, index = self.device.partition(":")
        if device not in ("auto", "cpu", "cuda") or (index and (device != "cuda" or not index.isdigit())):
            raise LlmkitError(f"bad training config: device {self.device!r} (auto, cpu, cuda, cuda:N)")
        if device == "cuda":
            check_device(self.device, "device")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(name: str, value, hint):
    """Convert `value` (a YAML scalar or a command-line string) to the field's type."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise LlmkitError(f"{name} cannot be set this way")
    raise LlmkitError(f"bad value for {name}: {value!r} is not {TYPE_NAMES.get(hint, hint.__name__)}")


def _set(values: dict, model: dict, key: str, value) -> None:
    # the objective may come later: accept keys of either model config; __post_init__ checks the right one
    train_types = _field_types(TrainConfig)
    model_types = {**_field_types(Seq2SeqConfig), **_field_types(EncoderConfig), **_field_types(ModelConfig)}
    if key.startswith("model."):
        sub = key[len("model."):]
        if sub not in model_types:
            raise LlmkitError(f"unknown model config key {sub!r} in {key}")
        model[sub] = _coerce(key, value, model_types[sub])
    elif key == "model" or key not in train_types:
        raise LlmkitError(f"unknown training config key {key!r}")
    else:
        values[key] = _coerce(key, value, train_types[key])


def load_train_config(path=None, overrides=(), **kwargs) -> TrainConfig:
    """TrainConfig from an optional YAML file, then `key=value` strings, then keyword values."""
    values: dict = {}
    model: dict = {}
    if path is not None:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise LlmkitError(f"cannot read config {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise LlmkitError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        raw = raw or {}
        if not isinstance(raw, dict):
            raise LlmkitError(f"{path} must hold a mapping of training settings")
        sub = raw.pop("model", None) or {}
        if not isinstance(sub, dict):
            raise LlmkitError(f"{path}: 'model' must be a mapping of model settings")
        for key, value in raw.items():
            _set(values, model, str(key), value)
        for key, value in sub.items():
            _set(values, model, f"model.{key}", value)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LlmkitError(f"bad override {item!r}: expected key=value")
        _set(values, model, key.strip(), value.strip())
    for key, value in kwargs.items():
        if value is not None:
            _set(values, model, key, value)
    return TrainConfig(**values, model=model)
