"""DICOM series read: :func:`radlogics_repro.io.load_study` against SimpleITK's ImageSeriesReader.

Both readers read the same folder (the benchmark study written as a CT series, file cache warm),
alternating, one warm-up each. SimpleITK: ``GetGDCMSeriesFileNames`` + ``Execute`` +
``GetArrayFromImage``, cast to float32 (the HU array ``load_study`` returns). SimpleITK comes with
the ``dev`` extra; without it the section says so.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from radlogics_repro.bench.timing import Row, interleaved
from radlogics_repro.io import load_study

DICOM_TARGET = 1.0


def read_with_simpleitk(folder: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute()).astype(np.float32)


def read_with_load_study(folder: Path) -> np.ndarray:
    return load_study(folder).hu


def dicom_rows(folder: Path, n_slices: int, repeats: int) -> list[Row]:
    figure = f"DICOM series read, {n_slices} slices: radlogics_repro.io.load_study"
    if importlib.util.find_spec("SimpleITK") is None:
        hu = {}
        timing = interleaved({"ours": lambda: hu.setdefault("ours", read_with_load_study(folder))}, repeats)
        return [Row("dicom", figure, f"{timing['ours'].rate(n_slices):.0f} slices/s",
                    reference="skipped: SimpleITK not installed (pip install -e .[dev])",
                    cpu=timing["ours"].cpu_share)]
    arrays = {}

    def read(name, reader):
        arrays[name] = reader(folder)

    timings = interleaved({"ours": lambda: read("ours", read_with_load_study),
                           "sitk": lambda: read("sitk", read_with_simpleitk)}, repeats)
    ours, sitk = timings["ours"].rate(n_slices), timings["sitk"].rate(n_slices)
    difference = float(np.abs(arrays["ours"] - arrays["sitk"]).max())
    return [Row("dicom", figure, f"{ours:.0f} slices/s ({timings['ours'].seconds:.2f} s)",
                reference=f"SimpleITK ImageSeriesReader {sitk:.0f} slices/s "
                          f"({timings['sitk'].seconds:.2f} s)",
                ratio=ours / sitk, ratio_text=f"{ours / sitk:.2f}x", target=f">= {DICOM_TARGET:.1f}x",
                met=ours / sitk >= DICOM_TARGET, cpu=timings["ours"].cpu_share,
                notes=[f"max |HU difference| between the readers: {difference:g}"])]
