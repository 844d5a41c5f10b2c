"""Synthetic chest-CT phantoms with ground truth: the package's embedded, offline default dataset.

* :func:`generate_case` -> :class:`PhantomCase`: one scan in memory (HU, lung and lesion masks,
  spacing, volumes), deterministic for a seed; scanning the same seed on several days gives a
  longitudinal series of one patient.
* :func:`generate_dataset`: many patients written as NIfTI (and optionally DICOM) with a
  patient-wise train/val/test manifest; also ``python -m radlogics_repro.synth`` (Hydra,
  ``conf/synth.yaml``).

What a phantom contains (details in the submodules): body outline with skin, subcutaneous fat
and muscle; ribs with costal cartilage, sternum, spine with discs, scapulae and clavicles; heart
with epicardial fat, great vessels, trachea and bronchi, oesophagus in a mediastinal fat envelope;
liver, spleen and stomach (with gas) under the diaphragm domes; two lungs (-900..-850 HU with an
anterior-posterior gravity gradient, oblique fissures) whose cross-sections grow from apex to base
around the cardiac notch; branching pulmonary arteries, veins and airways grown from the hila;
COVID-19-like opacities (GGO, consolidation, crazy paving) following a per-patient course; and
confounders (dependent atelectasis, nodules, emphysema, scars, streaks). Scans differ by breathing
phase, scanner kernel, noise, slice spacing, table and field-of-view padding. HU levels were
calibrated on LIDC-IDRI slices (lung median about -880, p5/p95 about -930/-770; fat about -95).

Limits: shapes are smooth analytic functions, not segmented anatomy; no contrast agent, no
motion, no beam hardening beyond thin streaks; lesion shapes are clusters of deformed ellipsoids.

Research use only, not for clinical diagnosis. The phantoms are analytic (no real patient data).
"""

from radlogics_repro.synth.anatomy import TISSUE
from radlogics_repro.synth.dataset import MANIFEST_COLUMNS, SLICE_COLUMNS, ensure_dataset, generate_dataset
from radlogics_repro.synth.lesions import CONSOLIDATION, GGO
from radlogics_repro.synth.phantom import PhantomCase, SynthError, generate_case

LUNG_RIGHT, LUNG_LEFT = 1, 2
"""Lung mask labels (patient's right lung = low x in canonical arrays)."""

__all__ = [
    "CONSOLIDATION", "GGO", "LUNG_LEFT", "LUNG_RIGHT", "MANIFEST_COLUMNS", "SLICE_COLUMNS",
    "TISSUE", "PhantomCase", "SynthError", "ensure_dataset", "generate_case", "generate_dataset",
]
