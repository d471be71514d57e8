"""Reports: one self-contained HTML page (plots embedded) from the files a run, evaluation or comparison wrote.

Nothing is re-computed here: the page reads `metrics.json` (with its provenance), `review.json` and
`gallery/` (`review.write_review`: threshold trade-offs, the most confident mistakes, Grad-CAM examples),
`summary.json`, `config.json`, `split.json`, `compare.json` and the plots beside them. Every metric is
named through `METRIC_LABELS`. The paper's published numbers are shown next to ours and
marked as theirs (test split, checkpoint chosen on that same split).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path, PurePath
from typing import Any, Iterable

from ..core.config import Config
from ..io.fileio import atomic_write_text
from ..io.plots import row_shares

# Soric, Pongrac, Inza: PReLU model on the official 624-image test split, checkpoint chosen on that split.
PAPER_TEST = {"accuracy": 0.9038, "precision": 0.8784, "recall": 0.9821, "specificity": 181 / 234, "f1": 0.9274,
              "roc_auc": 0.9521, "confusion_matrix": [[181, 53], [7, 383]], "n": 624}
METRIC_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "average_precision")
# metrics.json's keys as people name them: the one mapping every table and sentence of a report uses
METRIC_LABELS = {
    "accuracy": "Accuracy", "precision": "Precision (PPV)", "ppv": "Precision (PPV)", "npv": "NPV",
    "recall": "Sensitivity (recall)", "sensitivity": "Sensitivity (recall)", "specificity": "Specificity",
    "f1": "F1 score", "roc_auc": "ROC AUC", "average_precision": "Average precision (PR AUC)",
    "log_loss": "Log loss", "balanced_accuracy": "Balanced accuracy", "macro_f1": "Macro F1",
    "macro_roc_auc": "Macro ROC AUC (one vs rest)", "ece": "Expected calibration error", "brier": "Brier score",
    "threshold": "Threshold", "fp": "False positives", "fn": "False negatives", "tp": "True positives",
    "tn": "True negatives",
}
BINARY_CLASSES = ("NORMAL", "PNEUMONIA")
DISCLAIMER = "Research tool, not a medical device: not for diagnosis or treatment decisions."

_CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.theirs{color:#666;font-style:italic}
.note{background:#fff7e0;border-left:4px solid #e0a800;padding:.5em 1em}img{max-width:48%;margin:.3em}
code{background:#f4f4f4;padding:0 .2em}
figure{display:inline-block;margin:.3em;vertical-align:top;width:160px;font-size:12px;overflow-wrap:anywhere}
figure img{max-width:100%;width:160px;margin:0}"""


def _fmt(v: Any, digits: int = 4) -> str:
    """A figure as HTML text; an undefined metric (None or NaN) reads "n/a"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v))


def _num(v: float | None, digits: int) -> str:
    """A measured quantity (seconds, images/s, MB) to `digits` decimals; None reads "n/a"."""
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def _label(key: str) -> str:
    return METRIC_LABELS.get(key, key)


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _cm_text(cm: list[list[int]]) -> str:
    """A binary confusion matrix [[tn, fp], [fn, tp]] in words."""
    (tn, fp), (fn, tp) = cm
    return f"TN {tn}, FP {fp}, FN {fn}, TP {tp}"


def _ci(ci: list[float | None] | None) -> str:
    return f" <small>[{_fmt(ci[0])}, {_fmt(ci[1])}]</small>" if ci else ""


def _img(path: Path, alt: str) -> str:
    """`path` embedded as a data URL (PNG, or JPEG by its suffix); nothing when the file is not there."""
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'


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
    rows = [[_label(k), _fmt(m.get(k)) + _ci(m.get("ci95", {}).get(k)),
             f"<span class='theirs'>{_fmt(PAPER_TEST.get(k))}</span>"] for k in METRIC_NAMES]
    rows.append(["Confusion matrix", _cm_text(m["confusion_matrix"]),
                 f"<span class='theirs'>{_cm_text(PAPER_TEST['confusion_matrix'])}</span>"])
    rows.append(["Images", str(m["n"]), f"<span class='theirs'>{PAPER_TEST['n']}</span>"])
    cal = m.get("calibration", {})
    return (f"<h2>Results on the {html.escape(split)} split</h2>" + _warnings_box(m.get("warnings") or []) +
            f"<p>Decision threshold {_fmt(m['threshold'], 3)} (rule: <code>{html.escape(rule)}</code>, chosen on validation). "
            + _operating_point_text(m) + _ood_text(m) +
            f"Intervals: {html.escape(m.get('ci_method', 'none'))}, 95%.</p>"
            + _table(["Metric", f"pneumoscan, {html.escape(split)} split [95% CI]",
                      "paper, official test split (<i>theirs</i>)"], rows)
            + "<p class='theirs'>The paper's figures are theirs: one run, measured on the official test split with the "
              "checkpoint chosen on that same split, so they are optimistic and not directly comparable with a "
              "validation score.</p>"
            + f"<h3>Confusion matrix at threshold {_fmt(m['threshold'], 3)}</h3>"
            + _confusion_table(m["confusion_matrix"], BINARY_CLASSES)
            + (f"<p>Calibration: {_label('ece')} {_fmt(cal.get('ece'), 3)}, {_label('brier')} "
               f"{_fmt(cal.get('brier'), 3)}.</p>" if cal else "")
            + "".join(_img(eval_dir / f, a) for f, a in (("roc.png", "ROC curve"), ("pr.png", "precision-recall curve"),
                                                        ("confusion_matrix.png", "confusion matrix"),
                                                        ("reliability.png", "reliability diagram")))
            + _three_class_section(m, eval_dir))


def _warnings_box(warnings: list[str]) -> str:
    """What evaluate found that weakens these figures (few images, training images among them), in a box."""
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f"<div class='note'><strong>Read these figures with care:</strong><ul>{items}</ul></div>"


def _confusion_table(cm: list[list[int]], names: Iterable[str]) -> str:
    """Rows the true class, columns the predicted one: each count with its share of the true class."""
    names = [html.escape(n) for n in names]
    shares = row_shares(cm)
    head = (f"<tr><th rowspan='2'>true class</th><th colspan='{len(names)}'>predicted class</th>"
            "<th rowspan='2'>images</th></tr><tr>" + "".join(f"<th>{n}</th>" for n in names) + "</tr>")
    body = "".join(f"<tr><th>{n}</th>" + "".join(f"<td>{v} <small>({_percent(f)})</small></td>" for v, f in zip(row, share))
                   + f"<td>{sum(row)}</td></tr>" for n, row, share in zip(names, cm, shares))
    return (f"<table>{head}{body}</table><p><small>Percentages are of the true class (each row sums to 100%): "
            "the diagonal is each class's recall.</small></p>")


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None or math.isnan(fraction) else f"{100 * fraction:.1f}%"


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
        text += (f"At the model's own prior ({_fmt(base['prior'], 3)}): "
                 + ", ".join(f"{_label(k)} {_fmt(base[k])}" for k in ("accuracy", "recall", "specificity"))
                 + ". ")
    return text


def _three_class_section(m: dict[str, Any], eval_dir: Path) -> str:
    t = m.get("three_class")
    if not t:
        return ""
    keys = ("precision", "recall", "f1", "roc_auc")
    rows = [[html.escape(name), *(_fmt(c[k]) for k in keys), str(c["n"])] for name, c in t["per_class"].items()]
    return ("<h2>Three classes</h2><p>The figures above are pneumonia vs normal (P(pneumonia) = P(bacterial) + "
            "P(viral)). Per class, an image is called pneumonia at the threshold above, then bacterial or viral by the "
            "likelier of the two: "
            + ", ".join(f"{_label(k)} {_fmt(t[k])}" for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                                                      "macro_roc_auc")) + ".</p>"
            + _table(["Class", *(_label(k) + (" (one vs rest)" if k == "roc_auc" else "") for k in keys), "Images"], rows)
            + _confusion_table(t["confusion_matrix"], t["per_class"])
            + _img(eval_dir / "confusion_matrix_3class.png", "three-class confusion matrix"))


TRADE_OFF_COLUMNS = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
PROVENANCE_LABELS = {
    "pneumoscan": "pneumoscan version", "git_commit": "Source commit", "git_modified": "Source changed since that commit",
    "python": "Python", "torch": "PyTorch", "numpy": "NumPy", "device": "Device", "device_name": "Device model",
    "threads": "CPU threads", "checkpoint": "Checkpoint", "checkpoint_sha256": "Checkpoint SHA-256",
    "data_root": "Data root", "split": "Split", "date": "Evaluated (UTC)",
}


def review_sections(m: dict[str, Any], eval_dir: Path) -> list[str]:
    """Score histograms and threshold trade-offs, the most confident mistakes and Grad-CAM examples (from
    `review.json` and `gallery/`, when the evaluation wrote them), then the provenance."""
    path = eval_dir / "review.json"
    if not path.is_file():  # an evaluation from before the review
        return [_provenance_section(m)]
    review = json.loads(path.read_text())
    return [_trade_off_section(review, eval_dir), _gallery_section(review, eval_dir), _gradcam_section(review, eval_dir),
            _provenance_section(m)]


def _trade_off_section(review: dict[str, Any], eval_dir: Path) -> str:
    rows = []
    for r in review["trade_offs"]:
        cells = [_fmt(r["threshold"], 3) + (" (in use)" if r.get("operating") else ""),
                 *(_fmt(r[k], 3) for k in TRADE_OFF_COLUMNS), str(r["fp"]), str(r["fn"])]
        rows.append([f"<b>{c}</b>" for c in cells] if r.get("operating") else cells)
    return ("<h2>Scores and thresholds</h2><p>P(pneumonia) of each image by its true class, with the decision "
            "threshold; then what other thresholds would trade, on the same images and probabilities (the calibration "
            "and prior above). A threshold is chosen on validation, never on a test split.</p>"
            + _img(eval_dir / "score_histogram.png", "P(pneumonia) per true class")
            + _table(["Threshold", *(_label(k) for k in TRADE_OFF_COLUMNS), _label("fp"), _label("fn")], rows))


def _figure(eval_dir: Path, entry: dict[str, Any], image: str | None) -> str:
    """One gallery image with its file name (the whole path on hover) and P(pneumonia); only files inside
    gallery/ are embedded, whatever review.json says."""
    raw = PurePath(entry["path"]).name
    name = html.escape(raw)
    return (f"<figure title=\"{html.escape(entry['path'])}\">" + _img(eval_dir / "gallery" / PurePath(image or "").name, raw)
            + f"<figcaption>{name}<br>P(pneumonia) {_fmt(entry['p_pneumonia'], 3)}</figcaption></figure>")


def _gallery_section(review: dict[str, Any], eval_dir: Path) -> str:
    parts = ["<h2>Most confident mistakes</h2><p>The normal images with the highest P(pneumonia) (false positives) "
             "and the pneumonia images with the lowest (false negatives), up to six of each, as the model saw them "
             f"(at its input size), at threshold {_fmt(review['threshold'], 3)}.</p>"]
    for kind, title in (("false_positive", "False positives"), ("false_negative", "False negatives")):
        shown = [e for e in review["gallery"] if e["kind"] == kind]
        parts.append(f"<h3>{title}</h3>" + ("".join(_figure(eval_dir, e, e["thumbnail"]) for e in shown)
                                            or f"<p>No {title.lower()} at this threshold.</p>"))
    return "".join(parts)


def _gradcam_section(review: dict[str, Any], eval_dir: Path) -> str:
    cam = review.get("gradcam") or {}
    if not cam.get("available"):
        why = cam.get("reason") or "no image to explain (no true positives and no mistakes)"
        return f"<h2>Grad-CAM examples</h2><p class='note'>Grad-CAM examples were not made: {html.escape(why)}.</p>"
    parts = ["<h2>Grad-CAM examples</h2><p>Where the model found evidence for pneumonia (Grad-CAM of the pneumonia "
             "logit), on the most confident true positives and on the mistakes above. Each map is normalised per "
             "image: colours compare regions within one image, not one image with another.</p><p>low "
             + _img(eval_dir / "gallery" / "colour_bar.png", "colour scale of the maps") + " high</p>"]
    for kind, title in (("true_positive", "True positives"), ("false_positive", "False positives"),
                        ("false_negative", "False negatives")):
        shown = [e for e in review["gallery"] if e["kind"] == kind and e.get("gradcam")]
        if shown:
            parts.append(f"<h3>{title}</h3>" + "".join(_figure(eval_dir, e, e["gradcam"]) for e in shown))
    return "".join(parts)


def _provenance_section(m: dict[str, Any]) -> str:
    prov = m.get("provenance")
    if not prov:
        return "<h2>Provenance</h2><p>Not recorded: this evaluation was made before metrics.json held its provenance.</p>"

    def shown(key: str, value: Any) -> str:
        if key == "git_commit" and value is None:
            return "unknown (not run from a git checkout)"
        if key == "git_modified":
            return {True: "yes", False: "no"}.get(value, "unknown")
        text = html.escape(str(value))
        return f"<code>{text}</code>" if key in ("git_commit", "checkpoint", "checkpoint_sha256", "data_root") else text

    rows = [[label, shown(key, prov[key])] for key, label in PROVENANCE_LABELS.items() if key in prov]
    return "<h2>Provenance</h2>" + _table(["", ""], rows)


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
        f"{_num(summary['wall_seconds'], 1)} s on {html.escape(summary['device'])} "
        f"({_plural(summary['threads'], 'thread', 'threads')}, {_plural(summary.get('processes', 1), 'process', 'processes')}); "
        f"median {_num(summary['train_images_per_s_median'], 1)} training images/s; "
        f"peak memory {_num(summary.get('peak_memory_mb'), 0)} MB.</p>"
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
    sections = [*_run_sections(run_dir), metrics_section(m, eval_dir), *review_sections(m, eval_dir)]
    atomic_write_text(path, _page(f"pneumoscan run report: {run_dir.name}", sections))
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
                                   metrics_section(m, eval_dir), *review_sections(m, eval_dir)]))
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
