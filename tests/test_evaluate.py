"""Evaluation entry point on a tiny synthetic split with tiny untrained models."""

import json

import pandas as pd
import pytest
from hydra import compose, initialize_config_module

from radlogics_repro.evaluate import __main__ as evaluate_main


def test_evaluate_writes_tables_plots_and_provenance(tiny_dataset, tiny_models, tmp_path):
    out = tmp_path / "results" / "tiny"
    with initialize_config_module(config_module="conf", version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"data.manifest={tiny_dataset}", "data.generate_if_missing=false", "split=train",
            "max_cases=2", "n_boot=20", f"output_dir={out}", "name=tiny",
            f"lung_model={tiny_models['lung']}", f"classifier_model={tiny_models['classifier']}"])
    document = evaluate_main.run(cfg)
    for name in ("metrics.json", "summary.md", "cases.csv", "slices.csv", "roc.png",
                 "lung_dice.png", "corona_vs_reference.png", "corona_curves.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["n_cases"] == 2 == document["metrics"]["n_cases"]
    assert saved["environment"]["commit"]
    cases = pd.read_csv(out / "cases.csv")
    assert cases["lung_dice"].between(0, 1).all()
    # the tiny models' stored slice threshold is 0: every lung slice is called positive
    assert pd.read_csv(out / "slices.csv")["positive"].all()
    summary = (out / "summary.md").read_text()
    assert "Research use only" in summary and "slice AUC" in summary
    infection = saved["metrics"]["infection_vs_reference"]
    assert infection["n"] == 2
    bias = (cases["infection_cm3"] - cases["reference_lesion_cm3"]).mean()
    assert infection["bias"] == pytest.approx(bias)
    assert "infection volume vs reference" in summary
    assert set(cases["breath_phase"]) <= {"inhale", "exhale"} and (cases["lung_ml"] >= 0).all()
    breath = saved["metrics"]["breath_phase"]["all_scans"]
    assert breath["n_scans"] == 2 and breath["tp"] + breath["fp"] + breath["fn"] + breath["tn"] == 2
