"""``reid-train``: the typer app, with every command of both tasks registered on it."""

from __future__ import annotations

import typer

# Imports run one way, options <- command modules <- this package: no command module imports the app,
# so there is no cycle whose import order matters.
from training.cli import (
    attribute_neighbours,
    attributes,
    bundles,
    dataset,
    reid_evaluate,
    reid_predict,
    reid_train,
)

app = typer.Typer(
    name="reid-train",
    help="Train, evaluate and export the pedestrian-attribute and re-ID models (Market-1501).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# `reid-train --help` lists the commands in this order.
COMMANDS = (
    ("train-attributes", attributes.train_attributes),
    ("evaluate-attributes", attributes.evaluate_attributes),
    ("split", dataset.split),
    ("data-stats", dataset.data_stats),
    ("export", bundles.export),
    ("flip-bundle", bundles.flip_bundle),
    ("ensemble-bundle", bundles.ensemble_bundle),
    ("add-onnx", bundles.add_onnx),
    ("predict-attributes", attributes.predict_attributes),
    ("evaluate-neighbours", attribute_neighbours.evaluate_neighbours),
    ("train-reid", reid_train.train_reid),
    ("evaluate-reid", reid_evaluate.evaluate_reid),
    ("ablation", reid_train.ablation),
    ("predict-reid", reid_predict.predict_reid),
)
for _name, _command in COMMANDS:
    app.command(_name)(_command)


def main() -> None:
    app()
