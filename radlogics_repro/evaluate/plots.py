"""Evaluation figures and the Markdown summary (headless matplotlib)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from radlogics_repro import RESEARCH_USE_NOTICE  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.text(0.5, 0.005, RESEARCH_USE_NOTICE, ha="center", va="bottom", fontsize=7, color="darkred")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def roc_figure(evaluation, path: Path) -> Path:
    """Slice-level and case-level ROC curves side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    pairs = [(evaluation.slices["abnormal"], evaluation.slices["probability"], "slice (probability)"),
             (evaluation.cases["label"], evaluation.cases["positive_slice_ratio"],
              "case (positive-slice ratio)")]
    for ax, (labels, scores, title) in zip(axes, pairs, strict=True):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if np.unique(labels).size == 2:
            fpr, tpr, _ = roc_curve(np.asarray(labels, int), np.asarray(scores, float))
            from radlogics_repro.evaluate.metrics import auc

            ax.plot(fpr, tpr, lw=1.8, label=f"AUC {auc(labels, scores):.3f} (n={len(labels)})")
            ax.legend(loc="lower right")
        else:
            ax.text(0.5, 0.5, "one class only: no ROC", ha="center")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {title}",
               xlim=(0, 1), ylim=(0, 1.01))
    return _save(fig, path)


def lung_dice_figure(evaluation, path: Path) -> Path:
    """Box plot of per-case lung Dice: all cases and the severe-lesion subset."""
    cases = evaluation.cases
    groups = [cases["lung_dice"].to_numpy(), cases.loc[cases["severe"], "lung_dice"].to_numpy()]
    labels = [f"all (n={len(groups[0])})", f"severe (n={len(groups[1])})"]
    fig, ax = plt.subplots(figsize=(4.8, 4))
    ax.boxplot([g if len(g) else [np.nan] for g in groups], tick_labels=labels)
    for i, g in enumerate(groups, start=1):
        ax.scatter(np.full(len(g), i), g, s=12, alpha=0.6)
    ax.set(ylabel="lung Dice per case", title="Lung segmentation")
    return _save(fig, path)


def corona_agreement_figure(evaluation, path: Path) -> Path:
    """Corona Score against the reference lesion volume, and the Bland-Altman plot."""
    cases = evaluation.cases
    x = cases["reference_lesion_cm3"].to_numpy(float)
    y = cases["corona_score_cm3"].to_numpy(float)
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
    ax = axes[0]
    ax.scatter(x, y, c=cases["label"], cmap="coolwarm", s=22)
    top = max(float(np.nanmax(x)) if x.size else 1.0, float(np.nanmax(y)) if y.size else 1.0, 1.0)
    ax.plot([0, top], [0, top], color="0.6", lw=0.8, ls="--", label="identity")
    ax.set(xlabel="reference lesion volume (cm$^3$)", ylabel="Corona Score (cm$^3$)",
           title="Corona Score vs reference (red: COVID-like case, blue: not)")
    ax.legend(loc="upper left")
    ax = axes[1]
    mean, diff = (x + y) / 2.0, y - x
    ax.scatter(mean, diff, s=22)
    if diff.size > 1:
        bias, sd = diff.mean(), diff.std(ddof=1)
        for value, style in ((bias, "-"), (bias - 1.96 * sd, "--"), (bias + 1.96 * sd, "--")):
            ax.axhline(value, color="0.4", ls=style, lw=0.9)
    ax.set(xlabel="mean of the two (cm$^3$)", ylabel="Corona Score - reference (cm$^3$)",
           title="Bland-Altman (bias, 95 % limits)")
    return _save(fig, path)


def corona_curves_figure(evaluation, path: Path) -> Path:
    """Corona Score and reference lesion volume over scan day for patients scanned more than once."""
    cases = evaluation.cases
    serial = [(p, g.sort_values("day")) for p, g in cases.groupby("patient_id") if len(g) > 1]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (patient, scans) in enumerate(serial):
        color = f"C{i % 10}"
        ax.plot(scans["day"], scans["corona_score_cm3"], "o-", color=color, label=f"{patient} Corona")
        ax.plot(scans["day"], scans["reference_lesion_cm3"], "s--", color=color, alpha=0.6,
                label=f"{patient} reference")
    if not serial:
        ax.text(0.5, 0.5, "no patient scanned more than once in this split", ha="center",
                transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
    ax.set(xlabel="scan day", ylabel="cm$^3$", title="Follow-up: Corona Score (solid) vs reference")
    return _save(fig, path)


def format_value(value, digits: int = 3) -> str:
    """A number for a table: `digits` decimals for floats, "n/a" for None or NaN, lists in brackets."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def frame_markdown(frame, digits: int = 3) -> str:
    """A pandas frame as a Markdown table (floats with ``digits`` decimals, NaN as n/a)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(format_value(v.item() if hasattr(v, "item") else v, digits) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def summary_markdown(document: dict) -> str:
    """The headline table of an evaluation, with its provenance."""
    m = document["metrics"]
    env = document["environment"]
    s, c = m["slice"], m["case"]
    rows = [
        ("cases / patients / lung slices", f"{m['n_cases']} / {m['n_patients']} / {m['n_slices']}"),
        ("slice AUC [95% CI, by patient]", f"{format_value(s['auc'])} {format_value(s['auc_ci95'])}"),
        ("slice sensitivity / specificity at the stored threshold",
         f"{format_value(s['at_stored_threshold']['sensitivity'])} / "
         f"{format_value(s['at_stored_threshold']['specificity'])}"),
        ("case AUC [95% CI, by patient]", f"{format_value(c['auc'])} {format_value(c['auc_ci95'])}"),
        ("case sensitivity / specificity at the stored case threshold "
         f"({format_value(c['at_stored_threshold']['threshold'])})",
         f"{format_value(c['at_stored_threshold']['sensitivity'])} / "
         f"{format_value(c['at_stored_threshold']['specificity'])}"),
        ("lung Dice, mean (min) over cases", f"{format_value(m['lung_dice']['all_mean'])} "
                                             f"({format_value(m['lung_dice']['all_min'])})"),
        (f"lung Dice, severe subset (n={m['lung_dice']['n_severe']})",
         format_value(m["lung_dice"]["severe_mean"])),
        ("infection Dice (mean over cases with lesions)",
         format_value(m["localization"]["infection_dice_mean"])),
        ("fine-map pixel AUROC in the lung", format_value(m["localization"]["pixel_auroc_mean"])),
        ("pointing game (positive slices with lesion)", format_value(m["localization"]["pointing_game"])),
        ("Corona Score vs reference: Pearson r / Spearman rho",
         f"{format_value(m['corona_vs_reference']['pearson_r'])} / "
         f"{format_value(m['corona_vs_reference']['spearman_rho'])}"),
        ("Corona Score - reference: bias [95% limits] cm^3",
         f"{format_value(m['corona_vs_reference']['bias'], 1)} "
         f"[{format_value(m['corona_vs_reference']['loa_low'], 1)}, "
         f"{format_value(m['corona_vs_reference']['loa_high'], 1)}]"),
    ]
    if "infection_vs_reference" in m:   # absent from metrics.json files written before it
        iv = m["infection_vs_reference"]
        rows += [("infection volume vs reference: Pearson r / Spearman rho",
                  f"{format_value(iv['pearson_r'])} / {format_value(iv['spearman_rho'])}"),
                 ("infection volume - reference: bias [95% limits] cm^3",
                  f"{format_value(iv['bias'], 1)} [{format_value(iv['loa_low'], 1)}, "
                  f"{format_value(iv['loa_high'], 1)}]")]
    if "breath_phase" in m:
        bp = m["breath_phase"]
        rows.append(("breath phase from lung volume, F1 (exhalation positive): all scans / "
                     "patients with >= 2 scans",
                     f"{format_value(bp['all_scans']['f1'])} (n={bp['all_scans']['n_scans']}) / "
                     f"{format_value(bp['longitudinal_patients']['f1'])} "
                     f"(n={bp['longitudinal_patients']['n_scans']})"))
    if "at_98.2%_sensitivity" in c:
        hs = c["at_98.2%_sensitivity"]
        rows.insert(5, ("case sensitivity / specificity at the 98.2 %-sensitivity point",
                        f"{format_value(hs['sensitivity'])} / {format_value(hs['specificity'])}"))
    lines = [f"# Evaluation `{document['name']}` (split `{document['split']}`)", "",
             f"{RESEARCH_USE_NOTICE} Data: {document['data']['name']} "
             f"(`{Path(document['data']['manifest']).parent.name}`), synthetic unless stated.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", f"Models: lung `{document['models']['lung']}` (init "
                  f"{document['models']['lung_init']}), classifier `{document['models']['classifier']}` "
                  f"(init {document['models']['classifier_init']}).  ",
              f"Command: `{document.get('command') or 'python -m radlogics_repro.evaluate'}`; "
              f"commit {env['commit']}; {env['date']}; {env['machine']}; "
              f"TensorFlow {env['tensorflow']}.", ""]
    return "\n".join(lines)
