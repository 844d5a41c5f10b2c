"""load_study on real LIDC-IDRI DICOM data, checked against SimpleITK's ImageSeriesReader.

Skipped when the shared data folder (../shared/data next to the repository, or the folder in
the RADLOGICS_SHARED_DATA environment variable) is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from nibabel import orientations as nio

from radlogics_repro.io import load_study, require_volume

pytestmark = pytest.mark.realdata

SHARED_DATA = Path(
    os.environ.get(
        "RADLOGICS_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)
LIDC = SHARED_DATA / "lidc-small"
LUNGMASK_SLICE = SHARED_DATA / "lungmask-slice" / "0.dcm"
LIDC_CASES = ["LIDC-IDRI-0001", "LIDC-IDRI-0002", "LIDC-IDRI-0003"]


def _sitk_canonical(folder: Path):
    """SimpleITK's volume of ``folder`` made canonical (LPS voxel axes): (hu zyx, RAS affine)."""
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    hu_zyx = sitk.GetArrayFromImage(image).astype(np.float32)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.array(image.GetSpacing())[None, :]
    lps[:3, 3] = image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    to_lps = nio.ornt_transform(nio.io_orientation(ras), nio.axcodes2ornt(("L", "P", "S")))
    xyz = hu_zyx.transpose(2, 1, 0)
    canonical = nio.apply_orientation(xyz, to_lps).transpose(2, 1, 0)
    return canonical, ras @ nio.inv_ornt_aff(to_lps, xyz.shape)


@pytest.mark.skipif(not LIDC.is_dir(), reason=f"{LIDC} not available")
@pytest.mark.parametrize("case", LIDC_CASES)
def test_lidc_stack_matches_simpleitk(case):
    folder = LIDC / case
    study = require_volume(load_study(folder))
    expected_hu, expected_affine = _sitk_canonical(folder)
    assert study.hu.shape == expected_hu.shape
    np.testing.assert_allclose(study.hu, expected_hu, atol=1e-3, rtol=0)
    np.testing.assert_allclose(study.affine, expected_affine, atol=1e-3)
    sitk_spacing = np.linalg.norm(expected_affine[:3, :3], axis=0)[::-1]  # (z, y, x)
    np.testing.assert_allclose(study.spacing, sitk_spacing, atol=1e-3)
    assert study.metadata["warnings"] == []
    assert study.metadata["modality"] == "CT" and study.metadata["source_kind"] == "dicom"
    assert "LIDC" not in repr(study.metadata)  # PatientID 'LIDC-IDRI-000N' must not leak


@pytest.mark.skipif(not LUNGMASK_SLICE.is_file(), reason=f"{LUNGMASK_SLICE} not available")
def test_lungmask_single_slice():
    study = load_study(LUNGMASK_SLICE)
    assert study.hu.shape == (1, 512, 512)
    assert float(study.hu.min()) == -2048.0 and float(study.hu.max()) == 1502.0
    assert study.spacing[1:] == pytest.approx((0.625, 0.625))
    assert study.metadata["warnings"] == []
