"""Tests for radlogics_repro.io: DICOM/NIfTI reading, canonical orientation, masks, bad input."""

from __future__ import annotations

import gzip
import logging
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit

from radlogics_repro import io
from radlogics_repro.io import StudyReadError, load_study, save_mask, write_dicom_series

SPACING = (2.5, 0.7, 0.8)  # (z, y, x) mm
ORIGIN = (-10.0, -20.0, 30.0)  # LPS mm of voxel (0, 0, 0)


def _volume(shape=(6, 16, 20), seed=0, lo=-1000, hi=1500):
    """Random HU volume with fractional values (exercises rounding)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(lo, hi, size=shape) + 0.3).astype(np.float32)


def _write(tmp_path, hu=None, name="series", spacing=SPACING, **kwargs):
    hu = _volume() if hu is None else hu
    kwargs.setdefault("origin_lps", ORIGIN)
    files = write_dicom_series(hu, spacing, tmp_path / name, **kwargs)
    return tmp_path / name, files, hu


def _edit(path, **attrs):
    """Rewrite one DICOM file with some attributes changed."""
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def _constant_slices(values, shape=(8, 10)):
    return np.stack([np.full(shape, v, dtype=np.float32) for v in values])


def _lps_world_of_pixel(ds, row, col):
    """LPS mm of pixel (row, col) of a DICOM slice, straight from its header."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return ipp + col * dc * iop[:3] + row * dr * iop[3:]


def _ras(lps):
    return np.array([-lps[0], -lps[1], lps[2]])


# ------------------------------------------------------------------------------------------
# study_from_array
# ------------------------------------------------------------------------------------------


def test_study_from_array_geometry_by_hand():
    study = io.study_from_array(np.zeros((3, 4, 5)), (2.0, 0.5, 0.25), origin_lps=(1, 2, 3))
    assert study.hu.dtype == np.float32 and study.hu.shape == (3, 4, 5)
    assert study.spacing == (2.0, 0.5, 0.25)
    assert study.pixel_area_mm2 == pytest.approx(0.125)
    assert study.voxel_volume_mm3 == pytest.approx(0.25)
    # voxel (x=4, y=3, z=2) -> LPS (1 + 4*0.25, 2 + 3*0.5, 3 + 2*2) = (2, 3.5, 7) -> RAS (-2,-3.5,7)
    np.testing.assert_allclose(study.affine @ [4, 3, 2, 1], [-2.0, -3.5, 7.0, 1.0])
    assert study.metadata["warnings"] == []


def test_study_from_array_mask_written_with_canonical_affine(tmp_path):
    study = io.study_from_array(np.zeros((3, 4, 5)), (2.0, 0.5, 0.25), origin_lps=(1, 2, 3))
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[2, 3, 4] = 1
    img = nib.load(save_mask(study, mask, tmp_path / "m.nii.gz"))
    np.testing.assert_allclose(img.affine, study.affine)
    assert img.shape == (5, 4, 3) and np.asarray(img.dataobj)[4, 3, 2] == 1


def test_study_from_array_rejects_2d_and_bad_spacing():
    with pytest.raises(ValueError, match="3-D"):
        io.study_from_array(np.zeros((4, 5)), (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        io.study_from_array(np.zeros((2, 4, 5)), (0, 1, 1))


# ------------------------------------------------------------------------------------------
# write_dicom_series + load_study round trips
# ------------------------------------------------------------------------------------------


def test_dicom_round_trip_hu_spacing_and_origin(tmp_path):
    folder, files, hu = _write(tmp_path)
    study = load_study(folder)
    assert study.hu.dtype == np.float32 and study.hu.shape == hu.shape
    assert np.abs(study.hu - hu).max() <= 1.0
    np.testing.assert_array_equal(study.hu, np.rint(hu - 1024) + 1024)  # stored int16 exact
    np.testing.assert_allclose(study.spacing, SPACING, atol=1e-4)
    # canonical voxel (0, 0, 0) is the first slice's ImagePositionPatient, LPS -> RAS
    np.testing.assert_allclose(study.affine[:3, 3], [10.0, 20.0, 30.0], atol=1e-6)
    assert study.metadata["source_kind"] == "dicom"
    assert study.metadata["n_slices"] == 6 and study.metadata["warnings"] == []
    assert study.source == str(folder)


def test_written_series_header_fields(tmp_path):
    folder, files, hu = _write(tmp_path, series_description="chest")
    assert [f.name for f in files] == [f"IM{k:04d}.dcm" for k in range(1, 7)]
    ds = pydicom.dcmread(files[2])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert [float(v) for v in ds.PixelSpacing] == [0.7, 0.8]  # [row spacing, column spacing]
    assert [float(v) for v in ds.ImagePositionPatient] == [-10.0, -20.0, 35.0]  # 30 + 2*2.5
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ds.InstanceNumber == 3 and ds.SeriesDescription == "chest"
    assert not list(tmp_path.glob(".*tmp*"))  # temporary folder renamed away


def test_write_dicom_series_is_deterministic_and_clips(tmp_path):
    hu = _volume(shape=(2, 4, 4))
    hu[0, 0, 0], hu[0, 0, 1] = -40000, 40000
    files_a = write_dicom_series(hu, SPACING, tmp_path / "a", seed=7)
    files_b = write_dicom_series(hu, SPACING, tmp_path / "b", seed=7)
    files_c = write_dicom_series(hu, SPACING, tmp_path / "c", seed=8)
    uid = [pydicom.dcmread(f[0]).SOPInstanceUID for f in (files_a, files_b, files_c)]
    assert uid[0] == uid[1] != uid[2]
    study = load_study(tmp_path / "a")
    assert study.hu[0, 0, 0] == -32768 - 1024 and study.hu[0, 0, 1] == 32767 - 1024


def test_write_dicom_series_extra_and_existing_folder(tmp_path):
    write_dicom_series(_volume((2, 4, 4)), SPACING, tmp_path / "s", extra={"SeriesNumber": 9})
    assert pydicom.dcmread(tmp_path / "s" / "IM0001.dcm").SeriesNumber == 9
    with pytest.raises(FileExistsError, match="IM0001.dcm"):
        write_dicom_series(_volume((2, 4, 4)), SPACING, tmp_path / "s")
    write_dicom_series(_volume((2, 4, 4)), SPACING, tmp_path / "s", seed=1, file_prefix="B")
    assert len(list((tmp_path / "s").iterdir())) == 4


def test_sort_order_ignores_file_names_and_instance_numbers(tmp_path):
    hu = _constant_slices([0, 100, 200, 300, 400])
    folder, files, _ = _write(tmp_path, hu)
    # shuffle file names (reverse them) and instance numbers
    for f, new_name, number in zip(files, ["e", "d", "c", "b", "a"], [3, 1, 5, 2, 4], strict=True):
        _edit(f, InstanceNumber=number)
        f.rename(folder / new_name)
    study = load_study(folder)
    np.testing.assert_array_equal(study.hu[:, 0, 0], [0, 100, 200, 300, 400])


def test_sort_order_by_position_hand_computed(tmp_path):
    # slice values a..e = 10..50 written with positions z = 7.5, -2.5, 2.5, 0, 5
    hu = _constant_slices([10, 20, 30, 40, 50])
    folder, files, _ = _write(tmp_path, hu)
    for f, z in zip(files, [7.5, -2.5, 2.5, 0.0, 5.0], strict=True):
        _edit(f, ImagePositionPatient=[-10, -20, z])
    study = load_study(folder)
    # ascending z: -2.5 (20), 0 (40), 2.5 (30), 5 (50), 7.5 (10)
    np.testing.assert_array_equal(study.hu[:, 0, 0], [20, 40, 30, 50, 10])
    assert study.spacing[0] == pytest.approx(2.5, abs=1e-4)
    np.testing.assert_allclose(study.affine[:3, 3], [10.0, 20.0, -2.5])


def test_z_spacing_comes_from_positions_not_slice_thickness(tmp_path):
    wrong = {"SliceThickness": "5", "SpacingBetweenSlices": "5"}
    folder, _, _ = _write(tmp_path, spacing=(1.25, 0.7, 0.8), extra=wrong)
    study = load_study(folder)
    assert study.spacing[0] == pytest.approx(1.25, abs=1e-4)
    assert study.metadata["slice_thickness_mm"] == 5.0


def test_non_dicom_files_are_skipped_next_to_good_ones(tmp_path):
    folder, _, hu = _write(tmp_path)
    (folder / "notes.txt").write_text("hello")
    (folder / "sub").mkdir()
    (folder / "sub" / "thumbs.db").write_bytes(b"\x00" * 300)
    study = load_study(folder)
    assert study.hu.shape == hu.shape


def test_recursive_folder_and_files_without_extension(tmp_path):
    folder, files, hu = _write(tmp_path)
    (folder / "a" / "b").mkdir(parents=True)
    for f in files[:3]:
        f.rename(folder / "a" / "b" / f.stem)
    study = load_study(tmp_path)
    assert np.abs(study.hu - hu).max() <= 1.0


def test_rescale_slope_and_intercept_applied(tmp_path):
    hu = _constant_slices([0, 0, 0])
    folder, files, _ = _write(tmp_path, hu)
    # stored value = 0 + 1024 = 1024 -> HU = 1024 * 0.5 - 100 = 412
    _edit(files[1], RescaleSlope="0.5", RescaleIntercept="-100")
    study = load_study(folder)
    np.testing.assert_array_equal(study.hu[:, 0, 0], [0, 412, 0])


def test_bits_stored_12_unused_bits_ignored(tmp_path):
    hu = _constant_slices([0, 0])
    folder, files, _ = _write(tmp_path, hu)
    ds = pydicom.dcmread(files[0])
    raw = np.full((8, 10), 0x7000 | 1024, dtype="<i2")  # junk in the 4 unused high bits
    ds.PixelData, ds.BitsStored, ds.HighBit = raw.tobytes(), 12, 11
    ds.save_as(files[0], enforce_file_format=True)
    study = load_study(folder)
    assert study.hu[0, 0, 0] == 0  # 1024 - 1024: the high bits are dropped


@pytest.mark.parametrize(
    "syntax",
    [pydicom.uid.ImplicitVRLittleEndian, pydicom.uid.DeflatedExplicitVRLittleEndian],
    ids=["implicit-vr", "deflated-fallback"],
)
def test_other_uncompressed_transfer_syntaxes(tmp_path, syntax):
    folder, files, hu = _write(tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.save_as(f, enforce_file_format=True)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    study = load_study(folder)
    np.testing.assert_array_equal(study.hu, np.rint(hu - 1024) + 1024)


def test_ct_image_storage_without_modality_is_accepted(tmp_path):
    folder, files, hu = _write(tmp_path)
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.Modality
        ds.save_as(f, enforce_file_format=True)
    assert load_study(folder).hu.shape == hu.shape


def test_single_dicom_file_is_a_one_slice_study(tmp_path):
    _, files, hu = _write(tmp_path)
    study = load_study(files[0])
    assert study.hu.shape == (1, 16, 20)
    assert np.abs(study.hu[0] - hu[0]).max() <= 1.0
    assert study.spacing[0] == pytest.approx(2.5)  # SpacingBetweenSlices of the single slice
    assert "single slice" in study.metadata["z_spacing_source"]
    with pytest.raises(StudyReadError, match="single slice") as err:
        io.require_volume(study)
    assert files[0].name in str(err.value)
    assert io.require_volume(load_study(tmp_path / "series")).hu.shape[0] == 6


def test_localizer_dropped(tmp_path):
    folder, _, hu = _write(tmp_path)
    scout = _volume((1, 16, 20), seed=3)
    write_dicom_series(
        scout, SPACING, folder, seed=5, file_prefix="LOC",
        extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"],
               "ImageOrientationPatient": [1, 0, 0, 0, 0, -1]},
    )
    study = load_study(folder)
    assert study.hu.shape == hu.shape and study.metadata["warnings"] == []


def test_non_axial_single_image_dropped_as_scout(tmp_path):
    folder, _, hu = _write(tmp_path)
    write_dicom_series(
        _volume((1, 16, 20), seed=3), SPACING, folder, seed=5, file_prefix="SCOUT",
        extra={"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]},
    )
    study = load_study(folder)
    assert study.hu.shape == hu.shape


def test_flipped_row_direction_is_made_canonical(tmp_path):
    # rows run toward patient right (-x): column j is at x = -10 - j*0.8. The slice normal is
    # then -z, so the reader sorts slices inferior->superior only after reorienting.
    hu = _volume(shape=(4, 6, 5))
    folder, files, _ = _write(tmp_path, hu, extra={"ImageOrientationPatient": [-1, 0, 0, 0, 1, 0]})
    study = load_study(folder)
    np.testing.assert_array_equal(study.hu, np.rint(hu[:, :, ::-1] - 1024) + 1024)
    np.testing.assert_allclose(study.spacing, SPACING, atol=1e-6)
    # canonical voxel (x=0, y=2, z=3) is stored pixel (row 2, col 4) of the 4th slice
    ds = pydicom.dcmread(files[3])
    expected = _ras(_lps_world_of_pixel(ds, row=2, col=4))
    np.testing.assert_allclose((study.affine @ [0, 2, 3, 1])[:3], expected, atol=1e-6)


# ------------------------------------------------------------------------------------------
# masks written back into the input's grid
# ------------------------------------------------------------------------------------------


def test_dicom_mask_world_position_matches_image_position_patient(tmp_path):
    folder, files, hu = _write(tmp_path)
    study = load_study(folder)
    mask = np.zeros(study.hu.shape, dtype=np.uint8)
    z, y, x = 4, 3, 7
    mask[z, y, x] = 2
    out = save_mask(study, mask, tmp_path / "out" / "mask.nii.gz")
    img = nib.load(out)
    data = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8 and data.shape == (20, 16, 6)
    (i, j, k), = np.argwhere(data == 2)
    world = (img.affine @ [i, j, k, 1])[:3]
    expected = _ras(_lps_world_of_pixel(pydicom.dcmread(files[z]), row=y, col=x))
    np.testing.assert_allclose(world, expected, atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != "mask.nii.gz"]


def _nifti_input(tmp_path, data_ijk, affine, name="in.nii.gz", qform_code=1, sform_code=1):
    img = nib.Nifti1Image(data_ijk, affine)
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    path = tmp_path / name
    nib.save(img, path)
    return path


def _ijk_data(shape=(5, 4, 3)):
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 500


def test_nifti_lps_stored_is_already_canonical(tmp_path):
    d = _ijk_data()
    affine = np.diag([-0.8, -0.7, 2.5, 1.0])
    affine[:3, 3] = [10, 20, 30]
    study = load_study(_nifti_input(tmp_path, d, affine))
    np.testing.assert_array_equal(study.hu, d.transpose(2, 1, 0))
    np.testing.assert_allclose(study.affine, affine)
    assert study.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert study.metadata["source_kind"] == "nifti" and study.metadata["nifti_axcodes"] == "LPS"


def test_nifti_ras_stored_is_flipped_in_x_and_y(tmp_path):
    d = _ijk_data()
    affine = np.diag([0.8, 0.7, 2.5, 1.0])
    study = load_study(_nifti_input(tmp_path, d, affine))
    np.testing.assert_array_equal(study.hu, d[::-1, ::-1, :].transpose(2, 1, 0))
    # canonical voxel (0, 0, 0) is file voxel (4, 3, 0): RAS (3.2, 2.1, 0)
    np.testing.assert_allclose(study.affine @ [0, 0, 0, 1], [3.2, 2.1, 0.0, 1.0])
    assert study.spacing == pytest.approx((2.5, 0.7, 0.8))


def _permuted_affine():
    # a 3-cycle of the axes: file axis i -> +A (0.7 mm), j -> +S (2.5 mm), k -> +R (0.8 mm)
    return np.array(
        [[0, 0, 0.8, -5.0], [0.7, 0, 0, 7.0], [0, 2.5, 0, 11.0], [0, 0, 0, 1]], dtype=float
    )


def test_nifti_permuted_axes_hand_permuted(tmp_path):
    d = _ijk_data((4, 3, 5))  # (i=A, j=S, k=R)
    study = load_study(_nifti_input(tmp_path, d, _permuted_affine()))
    # canonical (z, y, x) = (S, P, L) = (j, flipped i, flipped k)
    np.testing.assert_array_equal(study.hu, d[::-1, :, ::-1].transpose(1, 0, 2))
    assert study.hu.shape == (3, 4, 5)
    assert study.hu[2, 0, 3] == d[4 - 1 - 0, 2, 5 - 1 - 3]
    assert study.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert study.metadata["nifti_axcodes"] == "ASR"


@pytest.mark.parametrize("permuted", [False, True])
def test_nifti_mask_lands_on_input_grid(tmp_path, permuted):
    if permuted:
        d, affine = _ijk_data((4, 3, 5)), _permuted_affine()
    else:
        d, affine = _ijk_data((5, 4, 3)), np.diag([0.8, 0.7, 2.5, 1.0])
    src = _nifti_input(tmp_path, d, affine, qform_code=1, sform_code=2)
    study = load_study(src)
    mask = np.zeros(study.hu.shape, dtype=bool)
    z, y, x = 2, 0, 3
    mask[z, y, x] = True
    out = save_mask(study, mask, tmp_path / "mask.nii")
    img, ref = nib.load(out), nib.load(src)
    assert img.shape == ref.shape
    np.testing.assert_array_equal(img.affine, ref.affine)
    np.testing.assert_allclose(img.header.get_sform(), ref.header.get_sform())
    np.testing.assert_allclose(img.header.get_qform(), ref.header.get_qform())
    assert int(img.header["sform_code"]) == 2 and int(img.header["qform_code"]) == 1
    (i, j, k), = np.argwhere(np.asarray(img.dataobj) == 1)
    if permuted:  # (i, j, k) = (ni-1-y, z, nk-1-x) with (ni, nk) = (4, 5)
        assert (i, j, k) == (4 - 1 - 0, 2, 5 - 1 - 3)
    else:  # RAS stored: (i, j, k) = (ni-1-x, nj-1-y, z) with (ni, nj) = (5, 4)
        assert (i, j, k) == (5 - 1 - 3, 4 - 1 - 0, 2)
    assert d[i, j, k] == study.hu[z, y, x]  # the same voxel
    np.testing.assert_allclose(ref.affine @ [i, j, k, 1], study.affine @ [x, y, z, 1])


def test_nifti_4d_singleton_accepted_and_mask_keeps_4d_shape(tmp_path):
    d = _ijk_data()[..., None]
    src = _nifti_input(tmp_path, d, np.diag([0.8, 0.7, 2.5, 1.0]))
    study = load_study(src)
    assert study.hu.shape == (3, 4, 5)
    out = save_mask(study, np.ones(study.hu.shape, np.float64) * 0.5, tmp_path / "p.nii.gz")
    img = nib.load(out)
    assert img.shape == (5, 4, 3, 1) and img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(img.get_fdata(), 0.5)


def test_nifti_scaled_data_read_as_hu(tmp_path):
    d = np.zeros((4, 4, 2), dtype=np.int16)
    img = nib.Nifti1Image(d, np.diag([-1.0, -1.0, 1.0, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, tmp_path / "s.nii")
    study = load_study(tmp_path / "s.nii")
    np.testing.assert_array_equal(study.hu, -1024.0)


def test_load_mask_round_trips_through_input_grid(tmp_path):
    study = load_study(_nifti_input(tmp_path, _ijk_data((4, 3, 5)), _permuted_affine()))
    mask = (np.arange(study.hu.size).reshape(study.hu.shape) % 3).astype(np.uint8)
    out = save_mask(study, mask, tmp_path / "m.nii.gz")
    back = io.load_mask(out, study)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)
    prob = mask.astype(np.float32) / 4
    np.testing.assert_array_equal(io.load_mask(save_mask(study, prob, tmp_path / "p.nii"), study),
                                  prob)


def test_load_mask_of_dicom_study_and_grid_mismatch(tmp_path):
    folder, _, _ = _write(tmp_path)
    study = load_study(folder)
    mask = np.zeros(study.hu.shape, np.uint8)
    mask[1, 2, 3] = 1
    np.testing.assert_array_equal(io.load_mask(save_mask(study, mask, tmp_path / "m.nii"), study),
                                  mask)
    moved = io.study_from_array(study.hu, SPACING, origin_lps=(0.0, 0.0, 0.0))
    with pytest.raises(StudyReadError, match="mask affine .* does not match") as err:
        io.load_mask(tmp_path / "m.nii", moved)
    assert "m.nii" in str(err.value)
    small = io.study_from_array(study.hu[:3], SPACING, origin_lps=ORIGIN)
    with pytest.raises(StudyReadError, match=r"mask grid \(6, 16, 20\).*\(3, 16, 20\)"):
        io.load_mask(tmp_path / "m.nii", small)


def test_save_volume_hu_as_int16(tmp_path):
    folder, _, hu = _write(tmp_path)
    study = load_study(folder)
    out = io.save_volume(study, study.hu, tmp_path / "hu.nii.gz", dtype=np.int16)
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), study.hu)
    again = load_study(out)  # the NIfTI reads back to the same canonical study
    np.testing.assert_array_equal(again.hu, study.hu)
    np.testing.assert_allclose(again.affine, study.affine, atol=1e-5)


def test_save_mask_rejects_wrong_shape_and_labels(tmp_path):
    study = io.study_from_array(np.zeros((2, 3, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match=r"\(2, 4, 3\).*\(2, 3, 4\)"):
        save_mask(study, np.zeros((2, 4, 3), np.uint8), tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match="0..255"):
        save_mask(study, np.full((2, 3, 4), 300), tmp_path / "m.nii.gz")
    with pytest.raises(ValueError, match=".nii"):
        save_mask(study, np.zeros((2, 3, 4), np.uint8), tmp_path / "m.png")


# ------------------------------------------------------------------------------------------
# bad input: errors
# ------------------------------------------------------------------------------------------


def test_error_path_does_not_exist(tmp_path):
    with pytest.raises(StudyReadError, match="does not exist") as err:
        load_study(tmp_path / "nope")
    assert str(err.value).startswith(str(tmp_path / "nope") + ":")


def test_error_empty_folder(tmp_path):
    with pytest.raises(StudyReadError, match="empty folder"):
        load_study(tmp_path)


def test_error_folder_without_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("not dicom")
    (tmp_path / "b.bin").write_bytes(b"\x08\x00" * 4)  # looks like raw DICOM, is not
    with pytest.raises(StudyReadError, match="no DICOM files") as err:
        load_study(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_error_single_file_neither_dicom_nor_nifti(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 500)
    with pytest.raises(StudyReadError, match="not a DICOM or NIfTI") as err:
        load_study(tmp_path / "a.txt")
    assert "a.txt" in str(err.value)


def test_error_no_ct_images_names_modality(tmp_path):
    folder, _, _ = _write(tmp_path, extra={"Modality": "MR"})
    with pytest.raises(StudyReadError, match="no CT images.*MR") as err:
        load_study(folder)
    assert str(folder) in str(err.value)


def test_error_enhanced_ct_only(tmp_path):
    folder, _, _ = _write(tmp_path, extra={"SOPClassUID": io.ENHANCED_CT_IMAGE_STORAGE})
    with pytest.raises(StudyReadError, match="Enhanced.*not supported"):
        load_study(folder)


def test_warning_enhanced_ct_next_to_classic_ignored(tmp_path):
    folder, _, hu = _write(tmp_path)
    write_dicom_series(
        _volume((2, 16, 20), seed=2), SPACING, folder, seed=3, file_prefix="ENH",
        extra={"SOPClassUID": io.ENHANCED_CT_IMAGE_STORAGE},
    )
    study = load_study(folder)
    assert study.hu.shape == hu.shape
    assert study.metadata["warnings"] == ["ignored 2 Enhanced/multi-frame CT instance(s)"]


def test_error_ct_image_without_position_in_chosen_series(tmp_path):
    folder, files, _ = _write(tmp_path)
    ds = pydicom.dcmread(files[2])
    del ds.ImagePositionPatient
    ds.save_as(files[2], enforce_file_format=True)
    with pytest.raises(StudyReadError, match="missing or invalid ImagePositionPatient") as err:
        load_study(folder)
    assert str(err.value).startswith(str(files[2]))


def test_warning_ct_image_without_position_in_other_series(tmp_path):
    folder, _, hu = _write(tmp_path)
    (other,) = write_dicom_series(_volume((1, 16, 20)), SPACING, folder, seed=3, file_prefix="X")
    _edit(other, ImageOrientationPatient="")  # unreadable orientation, other series
    study = load_study(folder)
    assert study.hu.shape == hu.shape
    (warning,) = study.metadata["warnings"]
    assert "ignored 1 CT image(s) of other series" in warning and "X0001.dcm" in warning


def test_study_read_error_message_forms():
    assert str(StudyReadError("/a/b", "bad\nthing")) == "/a/b: bad thing"
    err = StudyReadError("/a/b: not a DICOM file")
    assert (err.path, err.problem) == ("/a/b", "not a DICOM file")
    assert str(err) == "/a/b: not a DICOM file"
    assert isinstance(err, ValueError)


def test_error_only_localizers(tmp_path):
    folder, _, _ = _write(tmp_path, extra={"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]})
    with pytest.raises(StudyReadError, match="only localizer"):
        load_study(folder)


def test_error_undecodable_compressed_transfer_syntax(tmp_path):
    folder, files, _ = _write(tmp_path)
    ds = pydicom.dcmread(files[2])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8 this is not a jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(files[2], enforce_file_format=True)
    with pytest.raises(StudyReadError) as err:
        load_study(folder)
    message = str(err.value)
    assert files[2].name in message and "JPEG Baseline" in message
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in message and "python-gdcm" in message
    assert "\n" not in message


@pytest.mark.parametrize("keep_bytes", [200, 900, -1000])
def test_error_truncated_dicom_among_good_ones(tmp_path, keep_bytes):
    folder, files, _ = _write(tmp_path)
    data = files[3].read_bytes()
    files[3].write_bytes(data[:keep_bytes])
    with pytest.raises(StudyReadError, match="truncated or corrupt") as err:
        load_study(folder)
    assert str(err.value).startswith(str(files[3]) + ":")


def test_error_garbage_after_dicm_marker(tmp_path):
    folder, files, _ = _write(tmp_path)
    files[1].write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\xff" * 40)
    with pytest.raises(StudyReadError, match="truncated or corrupt") as err:
        load_study(folder)
    assert files[1].name in str(err.value)


def test_error_inconsistent_pixel_spacing(tmp_path):
    folder, files, _ = _write(tmp_path)
    _edit(files[4], PixelSpacing=["0.7", "0.9"])
    with pytest.raises(StudyReadError, match="inconsistent PixelSpacing") as err:
        load_study(folder)
    assert files[4].name in str(err.value)


def test_error_inconsistent_rows_columns(tmp_path):
    folder, files, _ = _write(tmp_path)
    ds = pydicom.dcmread(files[0])
    extra = {"SeriesInstanceUID": ds.SeriesInstanceUID, "StudyInstanceUID": ds.StudyInstanceUID}
    write_dicom_series(
        _volume((1, 16, 12)), SPACING, folder, origin_lps=(-10, -20, 45), seed=4,
        file_prefix="ODD", extra=extra,
    )
    with pytest.raises(StudyReadError, match="inconsistent Rows/Columns") as err:
        load_study(folder)
    assert "ODD0001.dcm" in str(err.value)


def test_error_inconsistent_orientation_inside_series(tmp_path):
    folder, files, _ = _write(tmp_path)
    c, s = np.cos(np.radians(3)), np.sin(np.radians(3))
    _edit(files[2], ImageOrientationPatient=[1, 0, 0, 0, f"{c:.6f}", f"{s:.6f}"])
    with pytest.raises(StudyReadError, match="inconsistent ImageOrientationPatient") as err:
        load_study(folder)
    assert files[2].name in str(err.value)


def test_error_missing_slice_names_position(tmp_path):
    folder, files, _ = _write(tmp_path)
    files[3].unlink()  # z = 30 + 3 * 2.5 = 37.5 missing: gap 35 -> 40
    with pytest.raises(StudyReadError, match="missing slices") as err:
        load_study(folder)
    message = str(err.value)
    assert "35 and 40" in message and "IM0003.dcm" in message and "IM0005.dcm" in message


@pytest.mark.parametrize(
    ("iop", "label"), [([1, 0, 0, 0, 0, -1], "coronal"), ([0, 1, 0, 0, 0, -1], "sagittal")]
)
def test_error_non_axial_series_only(tmp_path, iop, label):
    folder, files, _ = _write(tmp_path, extra={"ImageOrientationPatient": iop})
    normal = np.cross(iop[:3], iop[3:])
    for k, f in enumerate(files):  # stack the slices along their own normal
        _edit(f, ImagePositionPatient=list(normal * 2.5 * k))
    with pytest.raises(StudyReadError, match=f"no axial CT series.*{label}"):
        load_study(folder)


def test_error_implausible_tilt(tmp_path):
    folder, files, _ = _write(tmp_path)
    for k, f in enumerate(files):
        _edit(f, ImagePositionPatient=[-10, -20 + 2.5 * k * np.tan(np.radians(40)), 30 + 2.5 * k])
    with pytest.raises(StudyReadError, match="gantry tilt of 40.0 degrees"):
        load_study(folder)


def test_error_nifti_unreadable(tmp_path):
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(StudyReadError, match="unreadable NIfTI") as err:
        load_study(bad)
    assert "bad.nii" in str(err.value)


def test_error_nifti_gzip_truncated(tmp_path):
    src = _nifti_input(tmp_path, _ijk_data((30, 30, 20)), np.eye(4))
    data = src.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudyReadError, match="unreadable NIfTI") as err:
        load_study(cut)
    assert "cut.nii.gz" in str(err.value) and "\n" not in str(err.value)
    assert gzip.decompress(data)  # the original was fine


def test_error_nifti_not_3d(tmp_path):
    src = _nifti_input(tmp_path, np.zeros((4, 4, 3, 2), np.int16), np.eye(4), name="t.nii.gz")
    with pytest.raises(StudyReadError, match=r"not a 3D volume \(shape \(4, 4, 3, 2\)\)"):
        load_study(src)
    flat = _nifti_input(tmp_path, np.zeros((4, 4), np.int16), np.eye(4), name="f.nii.gz")
    with pytest.raises(StudyReadError, match="not a 3D volume"):
        load_study(flat)


# ------------------------------------------------------------------------------------------
# bad input: warnings
# ------------------------------------------------------------------------------------------


def test_warning_several_series_chooses_largest(tmp_path, caplog):
    folder, _, hu = _write(tmp_path, series_description="big")
    write_dicom_series(
        _volume((3, 16, 20), seed=1), SPACING, folder, seed=9, file_prefix="SMALL",
        series_description="small", extra={"SeriesNumber": 2},
    )
    with caplog.at_level(logging.INFO, logger="radlogics_repro.io"):
        study = load_study(folder)
    assert study.hu.shape == hu.shape and np.abs(study.hu - hu).max() <= 1
    assert study.metadata["series_found"] == 2
    assert study.metadata["series_chosen"]["series_description"] == "big"
    assert study.metadata["series_others"][0]["n_images"] == 3
    (warning,) = study.metadata["warnings"]
    assert "2 series found" in warning and "'big'" in warning and "'small'" in warning
    assert any(r.levelno == logging.INFO and "2 series found" in r.message for r in caplog.records)


def test_warning_duplicates_dropped(tmp_path, caplog):
    folder, files, hu = _write(tmp_path)
    shutil.copy(files[2], folder / "copy_of_3")  # same SOPInstanceUID
    ds = pydicom.dcmread(files[4])  # same position, new SOPInstanceUID, higher InstanceNumber
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.InstanceNumber = 99
    ds.save_as(folder / "zz_same_position.dcm", enforce_file_format=True)
    with caplog.at_level(logging.WARNING, logger="radlogics_repro.io"):
        study = load_study(folder)
    assert study.hu.shape == hu.shape
    assert study.metadata["warnings"] == [
        "dropped 2 duplicate instance(s) (same SOPInstanceUID or same slice position)"
    ]
    assert any("duplicate" in r.message for r in caplog.records)


def test_warning_uneven_spacing_reports_min_max(tmp_path):
    folder, files, _ = _write(tmp_path)
    for f, z in zip(files, [0.0, 2.5, 5.0, 7.6, 10.0, 12.5], strict=True):
        _edit(f, ImagePositionPatient=[-10, -20, z])
    study = load_study(folder)
    (warning,) = study.metadata["warnings"]
    assert "uneven slice spacing" in warning and "2.4 to 2.6 mm" in warning
    assert study.spacing[0] == pytest.approx(2.5)


def test_warning_gantry_tilt_sheared_affine(tmp_path):
    folder, files, hu = _write(tmp_path)
    shift = 2.5 * np.tan(np.radians(10))  # y (posterior) shift per slice
    for k, f in enumerate(files):
        _edit(f, ImagePositionPatient=[-10, -20 + k * shift, 30 + 2.5 * k])
    study = load_study(folder)
    (warning,) = study.metadata["warnings"]
    assert "gantry tilt of 10.00 degrees" in warning
    assert study.metadata["gantry_tilt_deg"] == pytest.approx(10, abs=1e-3)
    assert study.spacing == pytest.approx(SPACING)  # perpendicular slice distance
    assert study.voxel_volume_mm3 == pytest.approx(abs(np.linalg.det(study.affine[:3, :3])))
    expected = _ras(_lps_world_of_pixel(pydicom.dcmread(files[5]), row=3, col=4))
    np.testing.assert_allclose((study.affine @ [4, 3, 5, 1])[:3], expected, atol=1e-5)
    out = save_mask(study, np.ones(study.hu.shape, np.uint8), tmp_path / "tilt.nii.gz")
    np.testing.assert_allclose(nib.load(out).header.get_sform(), study.affine, atol=1e-6)


@pytest.mark.parametrize(
    ("lo", "hi", "phrase"), [(0, 100, "no air"), (-1000, 6000, "exceeds 5000")]
)
def test_warning_implausible_hu_range(tmp_path, lo, hi, phrase):
    hu = _volume((3, 8, 8), lo=lo, hi=hi)
    hu[0, 0, 0], hu[0, 0, 1] = lo, hi
    folder, _, _ = _write(tmp_path, hu)
    study = load_study(folder)
    (warning,) = study.metadata["warnings"]
    assert phrase in warning


def test_warning_implausible_hu_range_nifti(tmp_path):
    study = load_study(_nifti_input(tmp_path, np.full((4, 4, 2), 40, np.int16), np.eye(4)))
    assert "no air" in study.metadata["warnings"][0]


# ------------------------------------------------------------------------------------------
# privacy
# ------------------------------------------------------------------------------------------


def test_metadata_has_no_identifying_fields(tmp_path):
    folder, files, _ = _write(
        tmp_path, patient_name="Doe^Jane", patient_id="PID-93817", birth_date="19610314",
        extra={"InstitutionName": "St Elsewhere", "AccessionNumber": "ACC77123",
               "ReferringPhysicianName": "House^Greg"},
    )
    ds = pydicom.dcmread(files[0])
    assert ds.PatientName == "Doe^Jane"  # really planted
    study = load_study(folder)
    text = repr(study.metadata)
    for secret in ("Doe", "Jane", "PID-93817", "19610314", "Elsewhere", "ACC77123", "House",
                   "20200101", ds.StudyInstanceUID, ds.SeriesInstanceUID):
        assert secret not in text
    assert study.metadata["study_uid_hash"] == io._hash_uid(ds.StudyInstanceUID)
    assert len(study.metadata["series_uid_hash"]) == 16
    out = save_mask(study, np.zeros(study.hu.shape, np.uint8), tmp_path / "m.nii")
    assert b"Doe" not in out.read_bytes() and b"PID-93817" not in out.read_bytes()
