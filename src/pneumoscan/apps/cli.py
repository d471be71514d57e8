"""Command line: `pneumoscan train | compare | evaluate | predict | explain | serve | export | audit`. `main(argv) -> int` so tests call it directly.

The parser and the flags that map onto fields of the run `Config` are built in `cli_parser` (its
`build_parser`, `config_from_args` and `default_data_root` are importable from here); this module owns the
command handlers. Each command imports what it needs when it runs (PyTorch alone takes seconds to load), so
`--help` and argument errors are quick.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from ..io.data import DataError
from ..io.images import ImageLoadError
from .cli_parser import build_parser, config_from_args, default_data_root


def cmd_train(a: argparse.Namespace) -> int:
    from ..tasks.train import train

    cfg = config_from_args(a)
    summary = train(cfg, a.out, device=a.device, resume=a.resume, overwrite=a.overwrite, progress=not a.no_progress,
                    tensorboard=a.tensorboard, strict=a.strict, cuda_graphs=a.cuda_graphs,
                    cudnn_benchmark=a.cudnn_benchmark)
    if not summary:  # a torchrun worker other than rank 0: rank 0 reports
        return 0
    print(json.dumps({"summary": summary}), flush=True)
    if not a.no_eval:  # imported here: plotting libraries cost seconds to load, and --no-eval needs none
        from ..tasks.evaluate import evaluate
        from ..tasks.report import write_run_report

        result = evaluate(Path(a.out) / "best.pt", "val", Path(a.out) / "eval-val", device=a.device, progress=not a.no_progress)
        keys = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "confusion_matrix", "n")
        print(json.dumps({"validation": {k: result[k] for k in keys}}), flush=True)
        print(f"report: {write_run_report(a.out, Path(a.out) / 'eval-val')}")
        if a.tensorboard:
            from ..io.tracking import TensorBoardLogger

            tracker = TensorBoardLogger(a.out)
            tracker.log_plots(Path(a.out) / "eval-val", summary["epochs"])
            tracker.close()
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from ..tasks.compare import compare, table_markdown

    result = compare(config_from_args(a), a.out, a.activations, a.seeds, a.split, a.device, progress=not a.no_progress,
                     cuda_graphs=a.cuda_graphs, precisions=a.precisions)
    print("\n".join(table_markdown(result)))
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from ..tasks.evaluate import evaluate

    result = evaluate(a.checkpoint, a.split, a.out, data_root=a.data, device=a.device, progress=not a.no_progress,
                      prevalence=a.prevalence, estimate=a.estimate_prevalence,
                      allow_training_images=a.allow_training_images, backend=a.backend)
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    keys = ("split", "n", "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "threshold", "confusion_matrix",
            "prior", "prior_source")
    print(json.dumps({k: result[k] for k in keys}))
    _print_estimate(result["prevalence_estimate"])
    print(f"report: {Path(a.out) / 'report.html'}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from ..tasks.predict import predict_paths

    if a.engine == "ray":
        return _predict_on_ray(a)
    results, estimated = predict_paths(a.checkpoint, a.paths, a.out, device=a.device, batch_size=a.batch_size,
                                       backend=a.backend, prevalence=a.prevalence, estimate=a.estimate_prevalence)
    _print_estimate(estimated)
    return _report_batch([r.error for r in results], f"images scored; wrote {a.out}")


def _predict_on_ray(a: argparse.Namespace) -> int:
    from ..tasks.cluster_predict import RayOptions, predict_on_ray

    options = RayOptions(address=a.ray_address, actors=a.actors, part_size=a.part_size, resume=a.resume)
    n, errors, estimated = predict_on_ray(a.checkpoint, a.paths, a.out, device=a.device, batch_size=a.batch_size,
                                          backend=a.backend, prevalence=a.prevalence, estimate=a.estimate_prevalence,
                                          options=options)
    _print_estimate(estimated)
    return _report_batch([None] * (n - len(errors)) + errors, f"images scored on Ray; wrote {a.out}")


def _print_estimate(est: dict | None) -> None:
    if est:
        lo, hi = est["interval"] or (float("nan"), float("nan"))
        print(f"estimated pneumonia prevalence {est['prevalence']:.3f} (95% interval {lo:.3f}-{hi:.3f}, "
              f"{est['n']} images; {est['method']})")


def _report_batch(errors: list, done: str) -> int:
    """One stderr line per unreadable file and a summary; exit 1 only when nothing could be read."""
    bad = [e for e in errors if e]
    for e in bad:
        print(f"error: {e}", file=sys.stderr)
    print(f"{len(errors) - len(bad)} {done}; {len(bad)} unreadable")
    return 0 if errors and len(bad) < len(errors) else 1


def cmd_explain(a: argparse.Namespace) -> int:
    from ..tasks.explain import explain_paths

    rows = explain_paths(a.checkpoint, a.paths, a.out, device=a.device, prevalence=a.prevalence, backend=a.backend)
    return _report_batch([r["error"] for r in rows], f"heatmaps written (see {Path(a.out) / 'explanations.csv'})")


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import serve

    serve(a.checkpoint, host=a.host, port=a.port, device=a.device, token=a.token, max_upload_mb=a.max_upload_mb,
          metrics_json=a.metrics, max_batch=a.max_batch, allow_hosts=a.allow_host, max_connections=a.max_connections,
          decode_slots=a.decode_slots, body_timeout_s=a.body_timeout, inference_timeout_s=a.inference_timeout,
          prevalence=a.prevalence, backend=a.backend)
    return 0


def cmd_adapt(a: argparse.Namespace) -> int:
    from ..tasks.adapt import adapt_checkpoint

    record = adapt_checkpoint(a.checkpoint, a.paths, a.out, labels_csv=a.labels, batchnorm=a.batchnorm,
                              device="cpu" if a.device == "auto" else a.device)
    for path, reason in record["unreadable"].items():
        print(f"error: {path}: {reason}", file=sys.stderr)
    print("\n".join(adaptation_lines(record)))
    for warning in record["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {a.out}")
    return 0


def adaptation_lines(record: dict) -> list[str]:
    """What `adapt` tells the user: the images used, the prevalence and its check, the rates to expect."""
    p = record["prevalence"]
    lo, hi = p["interval"] or (float("nan"), float("nan"))
    lines = [f"adapted to {record['images']} images ({len(record['unreadable'])} unreadable); BatchNorm statistics "
             f"{'re-estimated' if record['batchnorm'] else 'kept'}",
             f"site prevalence {p['prevalence']:.3f} (95% interval {lo:.3f}-{hi:.3f}; {p['source']}) "
             f"{'trusted' if p['trusted'] else 'NOT TRUSTED'}"
             + (f"; black-box shift estimate {p['bbse']:.3f}" if p.get("bbse") is not None else "")]
    expected = (record.get("labelled") or {}).get("expected")
    if expected:
        lines.append("expected at the site: " + ", ".join(
            f"{k} {expected[k]:.3f} ({expected[k + '_ci95'][0]:.3f}-{expected[k + '_ci95'][1]:.3f})"
            for k in ("accuracy", "sensitivity", "specificity")) + f" [{expected['method']}]")
    return lines


def cmd_export(a: argparse.Namespace) -> int:
    from ..networks.export import export_onnx

    print(f"wrote {export_onnx(a.checkpoint, a.out)}")
    return 0


def cmd_fit_ood(a: argparse.Namespace) -> int:
    from ..tasks.fitting import fit_checkpoint

    d = fit_checkpoint(a.checkpoint, a.data, a.out, device=a.device, quantile=a.quantile, progress=not a.no_progress)
    print(json.dumps(d.describe()))
    print(f"wrote {a.out or a.checkpoint}")
    return 0


def cmd_audit(a: argparse.Namespace) -> int:
    from ..tasks.audit import summary_lines, write_audit

    result = write_audit(a.data or default_data_root(), a.out, a.near_distance, a.max_mad)
    print("\n".join(summary_lines(result)))
    print(f"wrote {Path(a.out) / 'audit.json'} and {Path(a.out) / 'counts.png'}")
    return 0


def cmd_dicom_node(a: argparse.Namespace) -> int:
    import signal
    import threading

    from .dicom_node import run_node
    from .dicom_settings import CallingPeer, Destination, NodeSettings

    settings = NodeSettings(out=Path(a.out), ae_title=a.ae_title, bind=a.bind, port=a.port,
                            send_to=Destination.parse(a.send_to) if a.send_to else None,
                            allow_calling=tuple(CallingPeer.parse(text) for text in a.allow_calling),
                            secondary_capture=a.secondary_capture, max_associations=a.max_associations,
                            max_instance_mb=a.max_instance_mb, keep_instances=not a.no_keep,
                            send_attempts=a.send_attempts)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # stop cleanly: reports waiting to be sent are sent first
        signal.signal(sig, lambda *_: stop.set())
    run_node(a.checkpoint, settings, device=a.device, stop=stop, backend=a.backend)
    return 0


def cmd_dicomweb(a: argparse.Namespace) -> int:
    from .dicomweb import command

    return command(a)


def cmd_ensemble(a: argparse.Namespace) -> int:
    from ..tasks.ensemble import build_ensemble

    summary = build_ensemble(a.checkpoints, a.out, tta=a.tta, data_root=a.data, device=a.device,
                             progress=not a.no_progress)
    print(json.dumps(summary))
    print(f"wrote {a.out}")
    return 0


def cmd_import_keras(a: argparse.Namespace) -> int:
    from ..tasks.keras_import import import_keras

    print(json.dumps(import_keras(a.model, a.out, activation=a.activation, image_size=a.image_size,
                                  data_root=a.data or os.environ.get("PNEUMOSCAN_DATA", ""))))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = {"train": cmd_train, "compare": cmd_compare, "adapt": cmd_adapt, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export, "explain": cmd_explain, "serve": cmd_serve,
                "fit-ood": cmd_fit_ood, "audit": cmd_audit, "ensemble": cmd_ensemble, "dicom-node": cmd_dicom_node,
                "dicomweb": cmd_dicomweb,
                "import-keras": cmd_import_keras}
    try:
        return commands[args.command](args)
    except (DataError, ImageLoadError, ImportError, OSError, ValueError, RuntimeError) as e:  # OSError: also RunDirError
        print(f"pneumoscan {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pneumoscan {args.command}: interrupted; a training run can be continued with --resume", file=sys.stderr)
        return 130


def run() -> None:
    """The `pneumoscan` command and `python -m pneumoscan`: `main`, then a quick exit.

    At exit Python's garbage collector walks every object still alive, and PyTorch makes hundreds of
    thousands, which takes a noticeable part of a second. Freezing them first skips the walk; by then every file the
    command writes is written and closed.
    """
    code = main()
    gc.freeze()
    sys.exit(code)
