"""The command line's arguments: one argparse sub-parser per command, and the run `Config` flags.

Flags map onto fields of the run `Config` (one per field that has a help text in `config.setting`); a flag
left out keeps the recipe's value. `cli` owns the command handlers and `main`; this module only builds the
parser and turns parsed flags into a `Config`, so `--help` and argument errors load nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Sequence

from .. import __version__
from ..core.config import ACTIVATIONS, RECIPES, SECTIONS, Config, recipe
from ..io.data import DataError

BACKENDS = ["auto", "torch", "onnx", "openvino", "openvino-bf16"]  # predict.BACKENDS, without importing torch
DATA_HELP = "data root in Kaggle layout, ROOT/train/{NORMAL,PNEUMONIA} (default: $PNEUMOSCAN_DATA)"


def default_data_root() -> str:
    """$PNEUMOSCAN_DATA, the data folder the README tells users to set; DataError when it is not set."""
    root = os.environ.get("PNEUMOSCAN_DATA", "")
    if not root:
        raise DataError("no data folder given: pass --data ROOT or set PNEUMOSCAN_DATA=ROOT "
                        "(ROOT holds train/NORMAL and train/PNEUMONIA)")
    return root


def _config_fields(skip: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """(section, field) of every Config field that has a command-line flag (a `help` in its `setting`)."""
    return [(section, f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f.metadata.get("help") and f.name not in skip]


def _flag_of(f: Any) -> str:
    name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    return name.replace("--", "--no-", 1) if f.metadata["rule"] == ("bool",) and f.default is True else name


def _recipe_values(section: str, name: str) -> str:
    """'150 (paper, large-batch, tuned), 224 (resnet18-224)': a field's value in each recipe, for the help."""
    by_value: dict[str, list[str]] = {}
    for r, c in RECIPES.items():
        value = getattr(getattr(c, section), name)
        by_value.setdefault("none" if value == "" else str(value).lower(), []).append(r)
    if len(by_value) == 1:
        return next(iter(by_value))
    return ", ".join(f"{v} ({', '.join(rs)})" for v, rs in by_value.items())


def _add_config_flags(p: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per Config field that has a help text (`config.setting`); left out, the recipe's value holds.
    The help shows each recipe's value."""
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES), help="starting configuration (default: paper)")
    for section, f in _config_fields(skip):
        rule, dest = f.metadata["rule"], f"{section}.{f.name}"
        text = f.metadata["help"].replace("%", "%%")
        if rule == ("bool",):
            negated = f.default is True
            p.add_argument(_flag_of(f), dest=dest, action="store_false" if negated else "store_true", default=None,
                           help=f"{'do not ' if negated else ''}{text} (recipes: {_recipe_values(section, f.name)})")
            continue
        text += f" (default: the recipe's: {_recipe_values(section, f.name)})"
        if rule and rule[0] in ("int", "float"):
            p.add_argument(_flag_of(f), dest=dest, type=int if rule[0] == "int" else float,
                           metavar="N" if rule[0] == "int" else "X", help=text)
        else:
            p.add_argument(_flag_of(f), dest=dest, choices=rule, metavar=None if rule else "FILE", help=text)
    _add_device_flag(p)
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
                   help="on CUDA, run every step eagerly instead of replaying it as a CUDA graph")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_device_flag(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument("--device", default=default, help=f"auto | cpu | cuda | cuda:N (auto: CUDA when there is a GPU; "
                                                     f"default: {default})")


def config_from_args(a: argparse.Namespace) -> Config:
    """The recipe's Config with every flag given on the command line put in its place."""
    cfg = recipe(a.recipe).override("data", root=a.data or default_data_root())
    given: dict[str, dict[str, Any]] = {}
    for section, f in _config_fields():
        value = getattr(a, f"{section}.{f.name}", None)
        if value is not None:
            given.setdefault(section, {})[f.name] = value
    for section, values in given.items():
        cfg = cfg.override(section, **values)
    return cfg.override("train", seed=getattr(a, "seed", None))


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model; writes best.pt, last.pt, metrics.jsonl, config.json into --out")
    _add_config_flags(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--seed", type=int, help="seed for initialisation, shuffling and augmentation")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating best.pt on the validation split at the end")
    p.add_argument("--tensorboard", action="store_true", help="also log scalars and plots to RUN_DIR/tensorboard")
    p.add_argument("--strict", action="store_true", help="stop before training if any image is unreadable (default: list and skip)")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="on CUDA, let cuDNN time the candidate algorithms for each new shape instead of choosing by its "
                        "heuristics (slower start; for the paper's model no faster afterwards)")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="Table IV properly: activations x seeds, mean +- sd, differences vs noise")
    _add_config_flags(p, skip=("activation", "precision"))
    p.add_argument("--out", required=True, help="comparison folder (finished runs inside are reused)")
    p.add_argument("--activations", nargs="+", choices=ACTIVATIONS, default=list(ACTIVATIONS),
                   help="rectifiers of the paper's model to train (default: all four of Table IV)")
    p.add_argument("--precisions", "--precision", nargs="+", choices=["fp32", "bf16"],
                   help="train each activation in each of these precisions, as train's --precision (default: fp32)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="S",
                   help="seeds to train each row with (default: 0 1 2)")
    p.add_argument("--split", default="val", choices=["val", "test"], help="split the table reports (default: val)")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on a split; writes metrics.json, predictions.csv and plots")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="data root (default: the one the model was trained on)")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "kaggle_val"],
                   help="val: the patient-level validation split carved out of ROOT/train, exactly as in training; "
                        "test: ROOT/test; kaggle_val: ROOT/val; train: the rest of ROOT/train (default: val)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--allow-training-images", action="store_true",
                   help="score images the checkpoint was trained on (refused by default: their figures say "
                        "nothing about new patients)")
    _add_device_flag(p)
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="as predict's --backend (default here: torch, the reference); recorded in metrics.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_prevalence_flags(p, estimate=True)


def _add_prevalence_flags(p: argparse.ArgumentParser, estimate: bool) -> None:
    """--prevalence (and --estimate-prevalence): the site's prior, a property of the data, not of the model."""
    if estimate:
        p.add_argument("--prevalence", metavar="P|estimated", default=None,
                       help="the site's pneumonia prevalence (0<P<1): probabilities are moved to it by Bayes' rule; "
                            "'estimated': to the EM estimate from these images (default: the model's training prior)")
        p.add_argument("--estimate-prevalence", action="store_true",
                       help="estimate the images' pneumonia prevalence (EM, with a 95%% bootstrap interval), print "
                            "and record it; outputs change only with --prevalence estimated")
    else:
        p.add_argument("--prevalence", type=_prevalence, metavar="P", default=None,
                       help="the site's pneumonia prevalence (0<P<1): probabilities are moved to it by Bayes' rule "
                            "(default: the model's training prior)")


def _prevalence(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, not {text!r}") from None
    if not 0 < p < 1:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, not {text!r}")
    return p


def _add_checkpoint_and_images(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("checkpoint")
    p.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help=out_help)
    _add_device_flag(p)


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="probabilities for image files and folders, as a CSV")
    _add_checkpoint_and_images(p, "CSV to write (path, probability, label, error)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="images scored together (default: 32)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto (default): the fastest exact backend installed, logged (openvino, else onnx, else torch; "
                        "torch on a GPU); onnx: export in memory and run with ONNX Runtime on the CPU (pip install "
                        "'pneumoscan[onnx]'); openvino: the same export in OpenVINO, FP32; openvino-bf16: BF16, opt-in, "
                        "probabilities move by up to about 0.02 (docs/performance.md) (pip install 'pneumoscan[openvino]')")
    _add_prevalence_flags(p, estimate=True)
    _add_engine_flags(p)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("on a Ray cluster (--engine ray; pip install 'pneumoscan[cluster]'; docs/cluster.md)")
    g.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="ray: read, decode and score on a Ray cluster with Ray Data; inputs may also be globs, "
                        ".txt lists of paths and s3:// gs:// file:// URIs; --out may be .parquet (default: local)")
    g.add_argument("--ray-address", help="the cluster to join (default: $RAY_ADDRESS, else a Ray started here)")
    g.add_argument("--actors", type=int, metavar="N",
                   help="scoring actors, one model each (default: one per GPU, else one per 4 of half the CPUs)")
    g.add_argument("--part-size", type=int, default=256, metavar="N",
                   help="images per part written under OUT.parts/, the unit of --resume (default: 256)")
    g.add_argument("--resume", action="store_true", help="keep the parts an interrupted run wrote; score the rest")


def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="Grad-CAM heatmaps over the X-rays, one PNG per image, plus probabilities")
    _add_checkpoint_and_images(p, "folder for <name>_gradcam.png and explanations.csv")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="what scores the images, as predict's --backend (default here: torch, whose pass also gives "
                        "the heatmaps; another backend scores them in a second pass); heatmaps always come from the "
                        "PyTorch model")
    _add_prevalence_flags(p, estimate=False)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="web page and HTTP API around one checkpoint (pip install 'pneumoscan[serve]')")
    p.add_argument("checkpoint")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    _add_device_flag(p, "cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="as predict's --backend (default auto: the fastest exact backend installed, logged); heatmaps "
                        "always come from the PyTorch model")
    p.add_argument("--token", default=os.environ.get("PNEUMOSCAN_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' on every path but the page (/), /health and /docs "
                        "(default: $PNEUMOSCAN_TOKEN, else open)")
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest request body (413 above it)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most images of concurrent requests scored together (1: one at a time)")
    p.add_argument("--metrics", help="metrics.json for the model card (default: eval-val/ beside the checkpoint)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests for this host name (repeatable; '*': any). Loopback names and the "
                        "--host address are always answered; other Host headers get 400")
    p.add_argument("--max-connections", type=int, default=64, help="open connections beyond this get 503")
    p.add_argument("--decode-slots", type=int, default=None,
                   help="most images decoded at once (default: one per core); a request that waits too long gets 503")
    p.add_argument("--body-timeout", type=float, default=60, help="seconds a client may take to send its upload (408)")
    p.add_argument("--inference-timeout", type=float, default=120,
                   help="seconds a request may wait for the model before it gets 503")
    _add_prevalence_flags(p, estimate=False)


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="fit a checkpoint to a site from a batch of its images (BatchNorm statistics, "
                                     "prevalence; with --labels, calibration and the rates to expect)")
    _add_checkpoint_and_images(p, "the adapted checkpoint to write (.pt)")
    p.add_argument("--labels", metavar="LABELS.csv",
                   help="CSV with columns path,label (NORMAL or PNEUMONIA) for some of the images, at least 10 of each "
                        "class: refits the calibration on them and estimates the site's sensitivity, specificity "
                        "and accuracy")
    p.add_argument("--no-batchnorm", dest="batchnorm", action="store_false",
                   help="keep the training BatchNorm statistics (adapt only the prevalence, and the calibration "
                        "with --labels)")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX (self-describing; checked against PyTorch)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="the .onnx file to write")


def _add_fit_ood(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-ood", help="add the out-of-distribution detector to a checkpoint that has none "
                                       "(fitted on its training split, threshold on its validation split)")
    p.add_argument("checkpoint")
    p.add_argument("--data", default=None, help="data root (default: the one the model was trained on)")
    p.add_argument("--out", default=None, help="the checkpoint to write (default: CHECKPOINT itself, atomically)")
    p.add_argument("--quantile", type=float, default=0.99,
                   help="flag images scoring above this quantile of validation (default: 0.99)")
    _add_device_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_audit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="counts, patients, leaks, duplicates and image statistics of a data folder")
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--out", required=True, help="folder for audit.json and counts.png")
    p.add_argument("--near-distance", type=int, default=2, help="near-identical: max difference-hash bit distance")
    p.add_argument("--max-mad", type=float, default=4.0,
                   help="near-identical: max mean absolute grey difference of 32x32 thumbnails (0-255)")


def _add_dicom_node(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dicom-node", help="a DICOM node: scores CR/DX radiographs received by C-STORE, sends back "
                                          "Structured Reports (pip install 'pneumoscan[dicom-node]')")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="folder for results.csv and the received instances")
    p.add_argument("--backend", choices=BACKENDS, default="torch",
                   help="as predict's --backend (default here: torch); Secondary Capture heatmaps always come from "
                        "the PyTorch model")
    p.add_argument("--ae-title", default="PNEUMOSCAN",
                   help="this node's AE title; associations calling another are refused (default: PNEUMOSCAN)")
    p.add_argument("--allow-calling", action="append", default=[], metavar="AE@HOST",
                   help="accept associations only from this calling AE title at this host (repeatable; the host's "
                        "addresses are looked up at start). Without it any calling AE title is accepted")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default: 11112; 0: any free port)")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--send-to", metavar="AE@HOST:PORT", help="store a Structured Report of each scored image there")
    p.add_argument("--secondary-capture", action="store_true",
                   help="with --send-to, also send the Grad-CAM overlay as a Secondary Capture image")
    p.add_argument("--max-associations", type=int, default=8, help="associations at once; more are refused")
    p.add_argument("--max-instance-mb", type=float, default=64, help="largest instance accepted (0xA700 above it)")
    p.add_argument("--no-keep", action="store_true", help="do not keep received instances under --out")
    p.add_argument("--send-attempts", type=int, default=3, help="tries to store each report before giving up")
    _add_device_flag(p, "cpu")


def _add_dicomweb(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dicomweb", help="score the chest radiographs of a DICOMweb archive (QIDO-RS, WADO-RS) and store "
                                        "Structured Reports back (STOW-RS) (pip install 'pneumoscan[dicomweb]')",
                       allow_abbrev=False)  # no --token for --token-file: a secret typed there would be taken for a path
    p.add_argument("checkpoint")
    p.add_argument("--url", required=True, help="the DICOMweb service root, e.g. https://pacs.example.org/dicom-web")
    p.add_argument("--out", required=True, help="folder for results.csv, which also records what is done")
    p.add_argument("--study", nargs="+", default=[], metavar="UID", help="only these studies (StudyInstanceUID)")
    p.add_argument("--since", metavar="DATE", help="only studies of this date (YYYYMMDD or YYYY-MM-DD) or later (StudyDate)")
    p.add_argument("--modality", nargs="+", default=["CR", "DX"], metavar="M", help="modalities searched (default: CR DX)")
    p.add_argument("--limit", type=int, metavar="N", help="score at most N instances per pass")
    p.add_argument("--store-results", action="store_true", help="store a Structured Report of each scored image into its study")
    p.add_argument("--secondary-capture", action="store_true",
                   help="with --store-results, also store the Grad-CAM overlay as a Secondary Capture image")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="search again every SECONDS until Ctrl-C")
    p.add_argument("--token-file", metavar="FILE", help="a file holding the bearer token (default: $PNEUMOSCAN_DICOMWEB_TOKEN)")
    p.add_argument("--basic-auth-file", metavar="FILE", help="a file holding USER:PASSWORD (default: $PNEUMOSCAN_DICOMWEB_USER and "
                                             "$PNEUMOSCAN_DICOMWEB_PASSWORD)")
    p.add_argument("--ca-bundle", metavar="PEM", help="CA certificates (PEM) to verify the server's TLS certificate with (default: the system's)")
    p.add_argument("--timeout", type=float, default=60, metavar="SECONDS", help="seconds to wait for any one answer (default: 60)")
    p.add_argument("--attempts", type=int, default=4, metavar="N",
                   help="tries of a request that meets 429, 5xx or no connection, with backoff (default: 4)")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="instances fetched, scored and stored at once (default: 4)")
    _add_prevalence_flags(p, estimate=False)
    _add_device_flag(p, "cpu")


def _add_ensemble(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ensemble", help="combine runs of one recipe with different seeds into one checkpoint (mean "
                                        "of their logits, optionally over test-time views), refitted on validation")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="the members' best.pt files (one or more)")
    p.add_argument("--out", required=True, help="the ensemble checkpoint to write")
    p.add_argument("--tta", choices=["none", "zoom"], default="none",
                   help="zoom: also average over central zooms by 0.9 and 1.1 and, if the recipe flips, an up-down "
                        "flip (the views its training augmentation taught); default none")
    p.add_argument("--data", default=None, help="data root (default: the one the members were trained on)")
    _add_device_flag(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_import_keras(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-keras", help="a Keras model of the paper's network (.keras or .h5) as a pneumoscan checkpoint")
    p.add_argument("model", help="the .keras archive or .h5 file (model or weights alone)")
    p.add_argument("--out", required=True, help="the checkpoint to write (.pt)")
    p.add_argument("--activation", choices=ACTIVATIONS, default=None,
                   help="checked against the file; needed for weights alone without PReLU slopes")
    p.add_argument("--image-size", type=int, default=None, help="weights alone: the input size (default: 150)")
    p.add_argument("--data", default=None, help="data root recorded for evaluate (default: $PNEUMOSCAN_DATA, else none: evaluate then needs --data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pneumoscan", description="Train, evaluate and apply CNNs that tell pneumonia from normal on chest X-rays.")
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_compare(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_explain(sub)
    _add_serve(sub)
    _add_adapt(sub)
    _add_export(sub)
    _add_fit_ood(sub)
    _add_audit(sub)
    _add_import_keras(sub)
    _add_ensemble(sub)
    _add_dicom_node(sub)
    _add_dicomweb(sub)
    return parser
