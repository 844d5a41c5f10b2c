"""Rerun the paper's tables on the synthetic data and write results/paper_tables.md.

    python experiments/paper_tables.py [--max-cases N] [--name synthetic_holdout] \
        [--lung-run runs/lung_unet/<run>] [--classifier-run runs/classifier/<run>]

Steps (each skipped when its output exists, so a killed run continues):

1. the models: the newest finished runs of ``python -m radlogics_repro.train +experiment=lung_unet``
   and ``+experiment=classifier`` under runs/, or the runs given (train them first; the script does
   not, because that is the hour-long part: see README);
2. ``python -m radlogics_repro.evaluate data=synthetic_holdout`` on held-out synthetic patients
   (16 patients generated with another seed than the training data, so none was seen in training);
   an existing evaluation of the same name is reused only when it used the same two models;
3. one table, claim by claim (METHOD.md section 7): what the paper reports, what was obtained here,
   on which data, from which file.

The paper's data are private: every "here" number is on synthetic phantoms and says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlogics_repro import RESEARCH_USE_NOTICE, provenance  # noqa: E402
from radlogics_repro.analyze import latest_run_model  # noqa: E402
from radlogics_repro.evaluate.plots import format_value as _fmt  # noqa: E402


def model_runs(lung_run: Path | None, classifier_run: Path | None) -> tuple[Path, Path]:
    """The run folders of the two models: the ones given (relative to the checkout) or, for each
    one not given, the newest finished run under runs/."""
    runs = ROOT / "runs"
    lung_dir = ROOT / lung_run if lung_run else latest_run_model(runs, "lung_unet").parent
    classifier_dir = ROOT / classifier_run if classifier_run else latest_run_model(runs, "classifier").parent
    return lung_dir.resolve(), classifier_dir.resolve()


def model_file(run_dir: Path) -> str:
    """``runs/<task>/<run>/model.keras``: how an evaluation records the model it used."""
    return f"runs/{run_dir.parent.name}/{run_dir.name}/model.keras"


def evaluate(folder: Path, name: str, lung_dir: Path, classifier_dir: Path, max_cases: int | None,
             *overrides: str) -> Path:
    """``python -m radlogics_repro.evaluate data=synthetic_holdout split=test`` into ``folder``,
    unless an evaluation is already there; returns its metrics.json. An existing one is reused only
    when it used the same two models (otherwise an error: pass another name or remove it)."""
    done = folder / "metrics.json"
    lung_model, classifier_model = model_file(lung_dir), model_file(classifier_dir)
    if done.exists():
        used = json.loads(done.read_text())["models"]
        if (used["lung"], used["classifier"]) != (lung_model, classifier_model):
            raise SystemExit(f"error: {done}: evaluated other models ({used['lung']}, {used['classifier']}); "
                             "remove that folder, or write the evaluation elsewhere (paper_tables.py --name)")
        return done
    args = [sys.executable, "-m", "radlogics_repro.evaluate", "data=synthetic_holdout", "split=test",
            f"name={name}", f"output_dir={folder}", f"lung_model={lung_model}",
            f"classifier_model={classifier_model}", *overrides]
    if max_cases:
        args.append(f"max_cases={max_cases}")
    print("$", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)
    return done


def rows(evaluation: dict, classifier_run: dict, lung_run: dict, eval_file: str,
         classifier_file: str, lung_file: str) -> list[tuple[str, ...]]:
    m = evaluation["metrics"]
    case, slice_, dice = m["case"], m["slice"], m["lung_dice"]
    high = case.get("at_98.2%_sensitivity", {})
    data = f"synthetic hold-out ({m['n_cases']} scans, {m['n_patients']} patients)"
    cls = classifier_run["metrics"]
    return [
        ("case-level AUC, COVID vs not", "0.996 [0.989, 1.00], 157 patients",
         f"{_fmt(case['auc'])} {_fmt(case['auc_ci95'])}", data, eval_file),
        ("working point: sensitivity / specificity", "98.2% / 92.2%",
         f"{_fmt(high.get('sensitivity'))} / {_fmt(high.get('specificity'))} (threshold chosen for "
         ">= 98.2% sensitivity on these cases)", data, eval_file),
        ("slice-level AUC", "not reported", f"{_fmt(slice_['auc'])} {_fmt(slice_['auc_ci95'])}", data,
         eval_file),
        ("slice classifier, held-out split of its training data", "not reported",
         f"val AUC {_fmt(cls['val']['auc'])}, test AUC {_fmt(cls.get('test', {}).get('auc'))}",
         f"{classifier_run['data']['name']} (val {cls['val'].get('cases', {}).get('n', '?')} scans, "
         f"test {cls.get('test', {}).get('cases', {}).get('n', 0)} scans)", classifier_file),
        ("Corona Score tracks severity", "qualitative (curves)",
         f"Pearson r {_fmt(m['corona_vs_reference']['pearson_r'])}, Spearman "
         f"{_fmt(m['corona_vs_reference']['spearman_rho'])} against the true lesion volume", data,
         eval_file),
        ("lung Dice (peers: lungmask 0.98 +/- 0.03; COVID-19-CT-Seg 0.973 / 0.977)", "0.98",
         f"mean {_fmt(dice['all_mean'])} (min {_fmt(dice['all_min'])}); severe subset "
         f"{_fmt(dice['severe_mean'])} (n={dice['n_severe']})", data, eval_file),
        ("lung U-Net, validation slices (Dice averaged over slices)", "n/a",
         f"val Dice {_fmt(lung_run['metrics']['val']['dice_mean'])}", "synthetic default", lung_file),
        ("infection localization Dice (peer: COVID-19-CT-Seg 0.673 +/- 0.223, supervised)", "n/a",
         f"{_fmt(m['localization']['infection_dice_mean'])}; pointing game "
         f"{_fmt(m['localization']['pointing_game'])}; pixel AUROC "
         f"{_fmt(m['localization']['pixel_auroc_mean'])}", data, eval_file),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="synthetic_holdout")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--lung-run", type=Path, default=None, help="default: the newest finished one")
    parser.add_argument("--classifier-run", type=Path, default=None, help="default: the newest finished one")
    args = parser.parse_args(argv)
    start = time.time()
    lung_dir, classifier_dir = model_runs(args.lung_run, args.classifier_run)
    eval_file = evaluate(ROOT / "results" / args.name, args.name, lung_dir, classifier_dir, args.max_cases)
    evaluation = json.loads(eval_file.read_text())
    table = rows(evaluation, json.loads((classifier_dir / "metrics.json").read_text()),
                 json.loads((lung_dir / "metrics.json").read_text()),
                 str(eval_file.relative_to(ROOT)), f"runs/classifier/{classifier_dir.name}/metrics.json",
                 f"runs/lung_unet/{lung_dir.name}/metrics.json")
    env = provenance.environment()
    command = "python experiments/paper_tables.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# The paper's tables, rerun here", "", f"**{RESEARCH_USE_NOTICE}**", "",
        f"Command: `{command.strip()}`  ",
        f"Commit {env['commit']}; {env['date']}; {env['machine']}; this script's wall time "
        f"{(time.time() - start) / 60:.1f} min (the evaluation; training not included).  ",
        f"Models: `runs/lung_unet/{lung_dir.name}` (init: {evaluation['models']['lung_init']}), "
        f"`runs/classifier/{classifier_dir.name}` (init: {evaluation['models']['classifier_init']}).",
        "The paper's data are private: every number here is on synthetic phantoms.", "",
        "| claim | paper | here | data | file |", "|---|---|---|---|---|",
        *["| " + " | ".join(row) + " |" for row in table],
    ]
    out = ROOT / "results" / "paper_tables.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
