"""Reports: one self-contained HTML page (plots embedded) from the files a run, evaluation or comparison wrote.

Nothing is re-computed here: the page reads `metrics.json`, `summary.json`, `config.json`, `split.json`,
`compare.json` and the PNG plots beside them. The paper's published numbers are shown next to ours and
marked as theirs (test split, checkpoint chosen on that same split).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any, Iterable

from .fileio import atomic_write_text
from .config import Config

# Soric, Pongrac, Inza: PReLU model on the official 624-image test split, checkpoint chosen on that split.
PAPER_TEST = {"accuracy": 0.9038, "precision": 0.8784, "recall": 0.9821, "specificity": 181 / 234, "f1": 0.9274,
              "roc_auc": 0.9521, "confusion_matrix": [[181, 53], [7, 383]], "n": 624}
METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "average_precision")
DISCLAIMER = "Research tool, not a medical device: not for diagnosis or treatment decisions."

_CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.theirs{color:#666;font-style:italic}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.5em 1em}img{max-width:48%;margin:.3em}
code{background:#f4f4f4;padding:0 .2em}"""


def _fmt(v: Any, digits: int = 4) -> str:
    """A figure as HTML text; an undefined metric (None or NaN) reads "n/a"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


def _ci(ci: list[float | None] | None) -> str:
    return f" <small>[{_fmt(ci[0])}, {_fmt(ci[1])}]</small>" if ci else ""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title: str, sections: list[str]) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class='note'>{DISCLAIMER}</p>{''.join(sections)}</body></html>\n")


def metrics_section(m: dict[str, Any], eval_dir: Path) -> str:
    """Metrics with CIs beside the paper's, confusion matrix, ROC, PR, calibration."""
    rule = m.get("threshold_rule", {}).get("rule", "fixed")
    split = m["split"]
    rows = [[k, _fmt(m.get(k)) + _ci(m.get("ci95", {}).get(k)), f"<span class='theirs'>{_fmt(PAPER_TEST.get(k))}</span>"]
            for k in METRIC_NAMES]
    rows.append(["confusion matrix [[tn, fp], [fn, tp]]", _fmt(m["confusion_matrix"]),
                 f"<span class='theirs'>{PAPER_TEST['confusion_matrix']}</span>"])
    rows.append(["images", str(m["n"]), f"<span class='theirs'>{PAPER_TEST['n']}</span>"])
    cal = m.get("calibration", {})
    return (f"<h2>Results on the {html.escape(split)} split</h2>"
            f"<p>Decision threshold {_fmt(m['threshold'], 3)} (rule: <code>{html.escape(rule)}</code>, chosen on validation). "
            + _operating_point_text(m) + _ood_text(m) +
            f"Intervals: {html.escape(m.get('ci_method', 'none'))}, 95%.</p>"
            + _table(["metric", f"pneumoscan, {html.escape(split)} split [95% CI]",
                      "paper, official test split (<i>theirs</i>)"], rows)
            + "<p class='theirs'>The paper's figures are theirs: one run, measured on the official test split with the "
              "checkpoint chosen on that same split, so they are optimistic and not directly comparable with a "
              "validation score.</p>"
            + (f"<p>Calibration: expected calibration error {_fmt(cal.get('ece'), 3)}, Brier score {_fmt(cal.get('brier'), 3)}.</p>"
               if cal else "")
            + "".join(_img(eval_dir / f, a) for f, a in (("roc.png", "ROC curve"), ("pr.png", "precision-recall curve"),
                                                        ("confusion_matrix.png", "confusion matrix"),
                                                        ("reliability.png", "reliability diagram")))
            + _three_class_section(m, eval_dir))


def _ood_text(m: dict[str, Any]) -> str:
    """How many images of the split are outside what the model was trained on (its out-of-distribution score)."""
    ood = m.get("ood") or {}
    if not ood.get("available"):
        return "Out-of-distribution score: none (this checkpoint has no detector). "
    return (f"Outside what this model was trained on: {ood['flagged']} of {m['n']} images "
            f"({_fmt(ood.get('fraction_flagged'), 3)}; Mahalanobis distance of features pooled from <code>{html.escape(', '.join(ood['layers']))}</code> "
            f"at or above {_fmt(ood['threshold'], 2)}, the {_fmt(ood['quantile'], 3)} quantile of validation). ")


def _operating_point_text(m: dict[str, Any]) -> str:
    """The threshold's interval, the calibration and the prior the probabilities are at (older metrics.json
    files have none of these and get a line saying so)."""
    op = m.get("operating_point")
    if not op:
        return "Calibration: none recorded; prior: the model's own. "
    ci = op.get("threshold_interval")
    cal = op.get("calibration") or {}
    text = (f"Threshold 95% bootstrap interval on validation [{_fmt(ci[0], 3)}, {_fmt(ci[1], 3)}] "
            f"(calibrated scale, model prior). " if ci else "No threshold interval (fixed rule or not recorded). ")
    if cal.get("method") == "platt":
        text += (f"Calibration: Platt scaling (temperature {_fmt(cal.get('temperature'), 3)}, offset "
                 f"{_fmt(cal.get('offset'), 3)}), fitted on validation. ")
    elif cal.get("method") == "temperature":
        text += f"Calibration: temperature {_fmt(cal.get('temperature'), 3)}, fitted on validation. "
    else:
        text += "Calibration: none (raw model probabilities). "
    source = {"model": "the model's own training prior", "given": "given by the user",
              "estimated": "estimated from these images (EM)"}.get(op.get("prior_source"), op.get("prior_source"))
    text += f"Probabilities at a pneumonia prevalence of {_fmt(op.get('prior'), 3)} ({html.escape(str(source))}). "
    est = m.get("prevalence_estimate")
    if est:
        lo, hi = est["interval"] or (None, None)
        text += (f"Estimated prevalence of these images: {_fmt(est['prevalence'], 3)} [{_fmt(lo, 3)}, {_fmt(hi, 3)}] "
                 f"({html.escape(est['method'])}). ")
    base = m.get("at_model_prior")
    if base:
        text += (f"At the model's own prior ({_fmt(base['prior'], 3)}) accuracy would be {_fmt(base['accuracy'])}, "
                 f"recall {_fmt(base['recall'])}, specificity {_fmt(base['specificity'])}. ")
    return text


def _three_class_section(m: dict[str, Any], eval_dir: Path) -> str:
    t = m.get("three_class")
    if not t:
        return ""
    rows = [[html.escape(name), _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), _fmt(c["roc_auc"]), str(c["n"])]
            for name, c in t["per_class"].items()]
    return ("<h2>Three classes</h2><p>The figures above are pneumonia vs normal (P(pneumonia) = P(bacterial) + "
            "P(viral)). Per class, an image is called pneumonia at the threshold above, then bacterial or viral by the "
            f"likelier of the two: accuracy {_fmt(t['accuracy'])}, balanced accuracy {_fmt(t['balanced_accuracy'])}, "
            f"macro F1 {_fmt(t['macro_f1'])}, macro one-vs-rest ROC AUC {_fmt(t['macro_roc_auc'])}.</p>"
            + _table(["class", "precision", "recall", "F1", "ROC AUC (one vs rest)", "images"], rows)
            + _img(eval_dir / "confusion_matrix_3class.png", "three-class confusion matrix"))


def _run_sections(run_dir: Path) -> list[str]:
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text())).to_dict()  # older runs: defaults
    split = json.loads((run_dir / "split.json").read_text())
    data_rows = [[name, *(str(s["summary"][k]) for k in ("images", "patients", "normal", "pneumonia"))] for name, s in split.items()]
    t = cfg["train"]
    sections = [
        "<h2>Data</h2>"
        f"<p>Data root <code>{html.escape(cfg['data']['root'])}</code>. Validation carved out of train by patient "
        f"(fraction {cfg['data']['val_fraction']}, split seed {cfg['data']['split_seed']}); no patient is on both sides.</p>"
        + _table(["split", "images", "patients", "normal", "pneumonia"], data_rows),
        "<h2>Recipe</h2>"
        f"<p>Recipe <code>{html.escape(cfg['recipe'])}</code>: model <code>{html.escape(cfg['model']['name'])}</code> "
        f"({html.escape(cfg['model']['activation'])}), {cfg['preprocessing']['image_size']} px, {t['epochs']} epochs, "
        f"batch {t['batch_size']}, Adam lr {t['lr']}, class weight {t['class_weight']}, sampling {t['sampling']}, "
        f"seed {t['seed']}. Full configuration in <code>config.json</code>.</p>",
        "<h2>Training</h2>"
        f"<p>Best epoch (lowest validation loss): {summary['best_epoch']} of {summary['epochs']}. Wall time "
        f"{summary['wall_seconds']} s on {html.escape(summary['device'])} ({summary['threads']} threads, "
        f"{summary.get('processes', 1)} process(es)); median {summary['train_images_per_s_median']} training images/s; "
        f"peak memory {summary['peak_memory_mb']} MB.</p>"
        + _img(run_dir / "eval-val" / "accuracy.png", "accuracy per epoch") + _img(run_dir / "eval-val" / "loss.png", "loss per epoch"),
    ]
    if summary.get("unreadable_files"):
        sections.append("<h2>Unreadable files (skipped)</h2><ul>" + "".join(
            f"<li><code>{html.escape(p)}</code>: {html.escape(r)}</li>" for p, r in summary["unreadable_files"].items()) + "</ul>")
    return sections


def write_run_report(run_dir: str | Path, eval_dir: str | Path) -> Path:
    """run_dir/report.html: data, recipe, training curves, and the evaluation beside the paper's numbers."""
    run_dir, eval_dir = Path(run_dir), Path(eval_dir)
    m = json.loads((eval_dir / "metrics.json").read_text())
    path = run_dir / "report.html"
    atomic_write_text(path, _page(f"pneumoscan run report: {run_dir.name}", _run_sections(run_dir) + [metrics_section(m, eval_dir)]))
    return path


def write_eval_report(eval_dir: str | Path) -> Path:
    """eval_dir/report.html for one evaluation (a checkpoint on one split)."""
    eval_dir = Path(eval_dir)
    m = json.loads((eval_dir / "metrics.json").read_text())
    model = m["model"]
    intro = (f"<p>Checkpoint <code>{html.escape(m['checkpoint'])}</code>: model <code>{html.escape(model['name'])}</code> "
             f"({html.escape(model['activation'])}), recipe <code>{html.escape(model['recipe'])}</code>, "
             + (f"{html.escape(model['ensemble'])}. " if model.get("ensemble") else f"epoch {model['epoch']}. ") +
             f"Split <code>{html.escape(m['split'])}</code> of <code>{html.escape(m['data_root'])}</code>: "
             f"{m['data']['images']} images of {m['data']['patients']} patients ({m['data']['normal']} normal, "
             f"{m['data']['pneumonia']} pneumonia).</p>")
    curves = _img(eval_dir / "accuracy.png", "accuracy per epoch") + _img(eval_dir / "loss.png", "loss per epoch")
    path = eval_dir / "report.html"
    atomic_write_text(path, _page(f"pneumoscan evaluation: {m['split']} split",
                                  [intro, *(["<h2>Training curves</h2>" + curves] if curves else []),
                                   metrics_section(m, eval_dir)]))
    return path


def write_compare_report(out_dir: str | Path, markdown_lines: list[str]) -> Path:
    """out_dir/report.html for a comparison: the table, the paper's Table IV, and the noise statement."""
    out_dir = Path(out_dir)
    body, rows, header = [], [], None
    for line in markdown_lines + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if header is None:
                header = cells
            else:
                rows.append([html.escape(c) for c in cells])
            continue
        if header is not None:
            body.append(_table([html.escape(h) for h in header], rows))
            header, rows = None, []
        if line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line:
            cls = " class='theirs'" if "theirs" in line else ""
            body.append(f"<p{cls}>{html.escape(line)}</p>")
    path = out_dir / "report.html"
    atomic_write_text(path, _page("pneumoscan comparison of activations (Table IV, re-run)", ["".join(body)]))
    return path
