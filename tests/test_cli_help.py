"""`llmkit --help` content: one working example per command, the training settings with their real
defaults, the presets. The texts are static (no torch import for --help), so they are checked here."""
from __future__ import annotations

import dataclasses
import shlex

import typer

from llmkit.cli import app, main
from llmkit.cli_help import DECODER_PRESETS, ENCODER_PRESETS, EXAMPLES, TRAIN_SETTINGS


def test_every_example_parses_as_its_command():
    group = typer.main.get_command(app)
    assert set(EXAMPLES) == set(group.commands)
    for name, example in EXAMPLES.items():
        words = shlex.split(example)
        assert words[:2] == ["llmkit", name]
        group.commands[name].make_context(name, words[2:])  # raises on an unknown option or a bad value


def test_train_settings_list_every_field_with_its_default():
    from llmkit.train.config import TrainConfig

    listed = dict(item.split("=", 1) for item in TRAIN_SETTINGS.split(";")[0].split(", "))
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model":
            continue
        assert field.name in listed, field.name
        if field.default is not None:
            assert listed[field.name] == str(field.default).lower() or \
                listed[field.name] == str(field.default), (field.name, listed[field.name])
    config = TrainConfig(max_steps=300)
    assert (config.warmup_steps, config.lr_decay_steps) == (15, 300)  # "max_steps/20", "max_steps"


def test_presets_are_the_real_ones():
    from llmkit.model.config import PRESETS
    from llmkit.model.encoder import ENCODER_PRESETS as ENCODERS

    assert DECODER_PRESETS == tuple(PRESETS) and ENCODER_PRESETS == tuple(ENCODERS)


def test_help_shows_settings_presets_and_example(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main(["train", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "beta2=0.99" in out and "llama-tiny" in out and "Example: llmkit train" in out
