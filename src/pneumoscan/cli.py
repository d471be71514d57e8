"""Command line: `pneumoscan train | evaluate | predict`. `main(argv) -> int` so tests call it directly.

Flags map onto fields of the run `Config`; a flag left out keeps the recipe's value.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .config import RECIPES, recipe
from .data import DataError
from .images import ImageLoadError
from .metrics import THRESHOLD_RULES
from .models import ACTIVATIONS, model_names
from .train import RunDirError

DEFAULT_DATA = "../shared/data/chest_xray"


def default_data_root() -> str:
    return os.environ.get("PNEUMOSCAN_DATA", DEFAULT_DATA)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model; writes best.pt, last.pt, metrics.jsonl, config.json into --out")
    p.add_argument("--data", default=None, help=f"data root in Kaggle layout (default: $PNEUMOSCAN_DATA or {DEFAULT_DATA})")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES), help="starting configuration (default: paper)")
    p.add_argument("--model", choices=model_names(), help="registered model name")
    p.add_argument("--activation", choices=ACTIVATIONS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, help="seed for initialisation, shuffling and augmentation")
    p.add_argument("--val-fraction", type=float, help="share of train patients carved out for validation")
    p.add_argument("--split-seed", type=int, help="seed of the patient-level validation split")
    p.add_argument("--image-size", type=int)
    p.add_argument("--resize-filter", choices=["nearest", "bilinear", "bicubic", "area", "lanczos"])
    p.add_argument("--zoom", type=float, help="zoom range: factor drawn in [1-z, 1+z] per axis (0 turns it off)")
    p.add_argument("--no-vertical-flip", dest="vertical_flip", action="store_false", default=None)
    p.add_argument("--horizontal-flip", action="store_true", default=None)
    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES,
                   help="how the decision threshold is chosen on validation after training (paper: fixed 0.5)")
    p.add_argument("--target-sensitivity", type=float, help="for --threshold-rule sensitivity (default 0.95)")
    p.add_argument("--early-stopping", action="store_true", default=None,
                   help="stop when validation accuracy stops improving (Keras semantics of the notebook)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (auto picks CUDA when present)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating best.pt on the validation split at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on a split; writes metrics.json, predictions.csv and plots")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="data root (default: the one the model was trained on)")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "kaggle_val"])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="probabilities for image files and folders, as a CSV")
    p.add_argument("checkpoint")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="CSV to write (path, probability, label, error)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscan", description="Train, evaluate and apply CNNs that tell pneumonia from normal on chest X-rays.")
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    return parser


def cmd_train(a: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .train import train

    cfg = recipe(a.recipe)
    cfg = cfg.override("data", root=a.data or default_data_root(),
                       val_fraction=a.val_fraction, split_seed=a.split_seed)
    cfg = cfg.override("model", name=a.model, activation=a.activation)
    cfg = cfg.override("train", epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, early_stopping=a.early_stopping,
                       threshold_rule=a.threshold_rule, target_sensitivity=a.target_sensitivity)
    cfg = cfg.override("preprocessing", image_size=a.image_size, resize_filter=a.resize_filter)
    cfg = cfg.override("augmentation", zoom=a.zoom, vertical_flip=a.vertical_flip, horizontal_flip=a.horizontal_flip)
    summary = train(cfg, a.out, device=a.device, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress)
    if not summary:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    print(json.dumps({"summary": summary}), flush=True)
    if not a.no_eval:
        from .report import write_run_report

        result = evaluate(Path(a.out) / "best.pt", "val", Path(a.out) / "eval-val", device=a.device, progress=not a.no_progress)
        keys = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "confusion_matrix", "n")
        print(json.dumps({"validation": {k: result[k] for k in keys}}), flush=True)
        print(f"report: {write_run_report(a.out, Path(a.out) / 'eval-val')}")
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate

    result = evaluate(a.checkpoint, a.split, a.out, data_root=a.data, device=a.device, progress=not a.no_progress)
    keys = ("split", "n", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "threshold", "confusion_matrix")
    print(json.dumps({k: result[k] for k in keys}))
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from .predict import predict_paths

    results = predict_paths(a.checkpoint, a.paths, a.out, device=a.device, batch_size=a.batch_size)
    bad = [r for r in results if r.error]
    for r in bad:
        print(f"error: {r.error}", file=sys.stderr)
    print(f"{len(results) - len(bad)} images scored, {len(bad)} unreadable; wrote {a.out}")
    return 0 if results and len(bad) < len(results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict}
    try:
        return commands[args.command](args)
    except (DataError, ImageLoadError, RunDirError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pneumoscan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pneumoscan {args.command}: interrupted; a training run can be continued with --resume", file=sys.stderr)
        return 130
