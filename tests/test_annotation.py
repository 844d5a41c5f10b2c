"""Annotation round trip (DICOM SEG out and back), mask import checks, manifest import, breath phase."""

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from radlogics_repro import annotation, data, io
from radlogics_repro.breath_phase import evaluate_breath_phase, patient_breath_phases
from radlogics_repro.synth import generate_case
from radlogics_repro.synth.dataset import planted_identity

# ImageOrientationPatient: the default axial layout, and one with rows along -y and columns along
# -x (slice normal -z), which load_study has to transpose and flip into canonical order
ORIENTATIONS = {"standard": ["1", "0", "0", "0", "1", "0"], "transposed": ["0", "-1", "0", "-1", "0", "0"]}


def write_phantom_series(folder, orientation="standard", seed=5, patient_index=3):
    """A synthetic chest CT (radlogics_repro.synth) written as DICOM with planted identifiers."""
    case = generate_case(seed, in_plane=40, n_slices=10, label=1, threads=1)
    name, pid, birth = planted_identity(patient_index, seed)
    io.write_dicom_series(case.hu, case.spacing, folder, origin_lps=case.origin_lps, patient_name=name,
                          patient_id=pid, birth_date=birth, seed=seed * 100 + patient_index,
                          extra={"ImageOrientationPatient": ORIENTATIONS[orientation],
                                 "InstitutionName": "SYNTH GENERAL HOSPITAL"})
    return (name, pid, birth)


def masks_of(study):
    """Four overlapping masks from the study's own HU (so they are on its canonical grid)."""
    air = study.hu < -400
    body = np.zeros_like(air)
    body[:, 4:-4, 4:-4] = True
    lung = air & body
    half = study.hu.shape[2] // 2
    masks = {"lung_right": lung.copy(), "lung_left": lung.copy(),
             "ggo": (study.hu > -750) & (study.hu < -300) & body,
             "consolidation": (study.hu >= -300) & (study.hu < 100) & body}
    masks["lung_right"][:, :, half:] = False  # canonical x runs to the patient's left
    masks["lung_left"][:, :, :half] = False
    for mask in masks.values():
        mask[0] = False  # an empty slice: not stored in the SEG, must come back empty
    return masks


@pytest.fixture(scope="module", params=sorted(ORIENTATIONS))
def dicom_case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"ct_{request.param}") / "series"
    identity = write_phantom_series(folder, request.param)
    study = io.load_study(folder)
    masks = masks_of(study)
    seg_path = annotation.write_dicom_seg(masks, study, folder.parent / "seg.dcm")
    return {"folder": folder, "study": study, "masks": masks, "seg": seg_path, "identity": identity,
            "orientation": request.param}


def test_seg_round_trip_gives_back_the_masks(dicom_case):
    back = annotation.read_dicom_seg(dicom_case["seg"], dicom_case["study"])
    assert set(back) == set(annotation.SEGMENTS)
    for name, mask in dicom_case["masks"].items():
        assert back[name].shape == dicom_case["study"].hu.shape
        assert np.array_equal(back[name], mask), name


def test_seg_frames_reference_the_instance_they_overlay(dicom_case):
    """Checked from the DICOM geometry alone: a voxel's LPS position -> the source file at that
    position and its pixel -> the SEG frame referencing that file holds the voxel."""
    study, masks = dicom_case["study"], dicom_case["masks"]
    seg = pydicom.dcmread(dicom_case["seg"])
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(dicom_case["folder"].iterdir())]
    assert {str(ds.SOPInstanceUID) for ds in sources} == {uid for uid, _ in io.dicom_instances(study)}
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    frames = {}  # (source uid, segment number) -> frame pixels
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frames[(uid, number)] = seg.pixel_array[index]
    numbers = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    rng = np.random.default_rng(0)
    for name in ("lung_right", "ggo"):
        voxels = np.argwhere(masks[name])
        for z, y, x in voxels[rng.choice(len(voxels), 5, replace=False)]:
            ras = study.affine @ np.array([x, y, z, 1.0])
            lps = np.array([-ras[0], -ras[1], ras[2]])
            source = min(sources, key=lambda ds: abs(float(ds.ImagePositionPatient[2]) - lps[2]))
            assert abs(float(source.ImagePositionPatient[2]) - lps[2]) < 1e-3
            iop = np.array(source.ImageOrientationPatient, float)
            row_mm, col_mm = (float(v) for v in source.PixelSpacing)
            offset = lps - np.array(source.ImagePositionPatient, float)
            column, row = np.rint([offset @ iop[:3] / col_mm, offset @ iop[3:] / row_mm]).astype(int)
            frame = frames[(str(source.SOPInstanceUID), numbers[name])]
            assert frame[row, column] == 1, (name, z, y, x)


def test_seg_carries_no_planted_identity(dicom_case):
    raw = dicom_case["seg"].read_bytes()
    for secret in (*dicom_case["identity"], "SYNTH GENERAL HOSPITAL"):
        assert secret.encode() not in raw, secret
    seg = pydicom.dcmread(dicom_case["seg"])
    assert seg.Modality == "SEG" and seg.SOPClassUID == annotation.SEG_SOP_CLASS_UID
    assert str(seg.PatientName) == "ANONYMOUS^" and seg.PatientID == "ANONYMOUS"
    assert seg.PatientBirthDate == "" and seg.StudyDate == "" and seg.AccessionNumber == ""
    assert "Research use only" in seg.ContentDescription


def test_seg_of_another_series_is_refused(dicom_case, tmp_path):
    other = tmp_path / "other"
    write_phantom_series(other, seed=6, patient_index=4)
    with pytest.raises(annotation.AnnotationError, match=r"seg\.dcm: references .* outside the study"):
        annotation.read_dicom_seg(dicom_case["seg"], io.load_study(other))


def test_import_mask_from_seg_and_from_nifti_in_the_input_grid(dicom_case, tmp_path):
    study, masks = dicom_case["study"], dicom_case["masks"]
    lung = annotation.import_mask(dicom_case["seg"], study, "lung")
    expected = annotation.label_map_from_masks(masks, "lung")
    assert lung.dtype == np.uint8 and np.array_equal(lung, expected)
    assert set(np.unique(lung)) == {0, 1, 2}
    lesion = annotation.label_map_from_masks(masks, "lesion")
    path = io.save_mask(study, lesion, tmp_path / "lesion.nii.gz")
    assert np.array_equal(annotation.import_mask(path, study, "lesion"), lesion)


def _nifti(path, labels_zyx, affine):
    img = nib.Nifti1Image(np.ascontiguousarray(labels_zyx.transpose(2, 1, 0)).astype(np.uint8), affine)
    nib.save(img, str(path))
    return path


def test_import_mask_names_what_does_not_match(tmp_path):
    study = io.study_from_array(np.zeros((8, 12, 10), np.float32), (1.25, 0.7, 0.7), (5.0, -3.0, 40.0))
    labels = np.zeros(study.hu.shape, np.uint8)
    labels[2:5, 3:7, 2:6] = 1
    # the same grid stored flipped along x and y (RAS voxel axes): accepted, read back canonically
    flipped_affine = study.affine @ np.array([[-1, 0, 0, 9], [0, -1, 0, 11], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    ras_path = _nifti(tmp_path / "ras.nii.gz", labels[:, ::-1, ::-1], flipped_affine)
    assert np.array_equal(annotation.import_mask(ras_path, study, "lung"), labels)

    thick = study.affine.copy()
    thick[2, 2] = 2.5
    path = _nifti(tmp_path / "mask.nii.gz", labels, thick)
    with pytest.raises(annotation.AnnotationError) as err:
        annotation.import_mask(path, study, "lung")
    assert str(err.value).startswith(f"{path}: spacing (2.5, 0.7, 0.7) mm (z, y, x) does not match "
                                     "the study's (1.25, 0.7, 0.7) mm")
    assert "\n" not in str(err.value)

    path = _nifti(tmp_path / "cropped.nii.gz", labels[:6], study.affine)
    with pytest.raises(annotation.AnnotationError, match=r"grid 6 x 12 x 10 voxels \(z, y, x\) does not "
                                                         r"match the study's 8 x 12 x 10"):
        annotation.import_mask(path, study, "lung")

    shifted = study.affine.copy()
    shifted[2, 3] += 2.0  # 2 mm superior: 1.6 slices
    path = _nifti(tmp_path / "shifted.nii.gz", labels, shifted)
    with pytest.raises(annotation.AnnotationError, match=r"position is 2 mm \(1\.6 voxels\) away"):
        annotation.import_mask(path, study, "lung")

    rotated = study.affine.copy()
    angle = np.radians(3.0)
    rotated[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                                [0, 0, 1]]) @ study.affine[:3, :3]
    path = _nifti(tmp_path / "rotated.nii.gz", labels, rotated)
    with pytest.raises(annotation.AnnotationError, match="orientation differs from the study's by 3 deg"):
        annotation.import_mask(path, study, "lung")

    probabilities = nib.Nifti1Image(np.full((10, 12, 8), 0.4, np.float32), study.affine)
    nib.save(probabilities, str(tmp_path / "prob.nii.gz"))
    with pytest.raises(annotation.AnnotationError, match="not whole-number labels"):
        annotation.import_mask(tmp_path / "prob.nii.gz", study, "lesion")


def test_imported_cases_make_a_manifest_training_reads(dicom_case, tmp_path):
    study, masks = dicom_case["study"], dicom_case["masks"]
    manifest = tmp_path / "site" / "manifest.csv"
    lesion_nifti = io.save_mask(study, annotation.label_map_from_masks(masks, "lesion"),
                                tmp_path / "corrected_lesion.nii.gz")
    annotation.import_case(dicom_case["folder"], manifest, case_id="S001_d0", patient_id="S001",
                           split="train", lung_mask=dicom_case["seg"], lesion_mask=lesion_nifti)
    nifti_study = tmp_path / "site" / "images" / "S002_d0.nii.gz"
    nifti_study.parent.mkdir(parents=True)
    io.save_volume(study, study.hu, nifti_study, dtype=np.int16)
    lung_nifti = io.save_mask(study, annotation.label_map_from_masks(masks, "lung"), tmp_path / "lung.nii.gz")
    annotation.import_case(nifti_study, manifest, case_id="S002_d0", patient_id="S002", split="val",
                           lung_mask=lung_nifti)

    table = pd.read_csv(manifest)
    assert list(table["case_id"]) == ["S001_d0", "S002_d0"]
    assert table.loc[0, "lung_mask"] == "masks/S001_d0_lung.nii.gz"  # relative to the manifest
    assert table.loc[1, "image"] == "images/S002_d0.nii.gz"
    assert table.loc[0, "label"] == 1 and pd.isna(table.loc[1, "label"])
    frame = data.read_manifest(manifest, required=("image", "lung_mask"))
    slices = data.load_segmentation_slices(frame, "train", size=32, step_mm=0.0)
    n_lung = int(np.sum(masks["lung_right"].any(axis=(1, 2)) | masks["lung_left"].any(axis=(1, 2))))
    assert len(slices) >= n_lung and slices.masks.max() == 1
    written = io.load_mask(tmp_path / "site" / "masks" / "S001_d0_lung.nii.gz", study)
    assert np.array_equal(written, annotation.label_map_from_masks(masks, "lung"))

    with pytest.raises(annotation.AnnotationError, match="S001_d0 is already listed"):
        annotation.add_to_manifest(manifest, case_id="S001_d0", patient_id="S001", split="train",
                                   image=nifti_study)
    with pytest.raises(annotation.AnnotationError, match="several splits"):
        annotation.add_to_manifest(manifest, case_id="S001_d5", patient_id="S001", split="test",
                                   image=nifti_study)
    assert len(pd.read_csv(manifest)) == 2  # refused rows leave the file as it was


def test_export_command_writes_a_seg_from_analysis_masks(dicom_case, tmp_path, capsys):
    study, masks = dicom_case["study"], dicom_case["masks"]
    analysis = tmp_path / "analysis" / "case"
    io.save_mask(study, annotation.label_map_from_masks(masks, "lung"), analysis / "lung_mask.nii.gz")
    io.save_mask(study, annotation.label_map_from_masks(masks, "lesion"), analysis / "infection_mask.nii.gz")
    out = tmp_path / "export" / "case_seg.dcm"
    annotation.main(["export", f"input={dicom_case['folder']}", f"analysis={analysis}", f"out={out}"])
    assert "Research use only" in capsys.readouterr().out
    back = annotation.read_dicom_seg(out, study)
    for name, mask in masks.items():  # disjoint masks survive the label maps of analyze
        assert np.array_equal(back[name], mask), name

    with pytest.raises(SystemExit) as stop:
        annotation.main(["export", f"input={dicom_case['folder']}", "colour=red", f"out={out}"])
    assert stop.value.code == 2
    assert "unknown setting 'colour=red'" in capsys.readouterr().err


def test_breath_phase_rule_on_known_volumes():
    assert patient_breath_phases([4000.0, 4100.0, 2500.0]) == ["inhale", "inhale", "exhale"]
    assert patient_breath_phases([4000.0, 3300.0]) == ["inhale", "inhale"]  # 0.825 of the largest
    assert patient_breath_phases([3200.0, 4000.0], ratio=0.85) == ["exhale", "inhale"]
    assert patient_breath_phases([2500.0]) == ["exhale"]  # one scan: below 3000 mL
    assert patient_breath_phases([3500.0]) == ["inhale"]
    with pytest.raises(ValueError, match="positive"):
        patient_breath_phases([4000.0, 0.0])

    scans = pd.DataFrame({
        "patient_id": ["A", "A", "A", "B", "C", "C"],
        "lung_volume_ml": [4000.0, 4100.0, 2500.0, 2900.0, 3000.0, 3100.0],
        "breath_phase": ["inhale", "inhale", "exhale", "inhale", "exhale", "inhale"],
    })
    # A: the exhale scan found (TP); B: a small single inhale scan called exhale (FP); C: an exhale
    # scan at 0.97 of the patient's largest is missed (FN)
    result = evaluate_breath_phase(scans)
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (1, 1, 1, 3)
    assert result["f1"] == pytest.approx(0.5) and result["precision"] == pytest.approx(0.5)
    longitudinal = evaluate_breath_phase(scans, longitudinal_only=True)
    assert (longitudinal["tp"], longitudinal["fp"], longitudinal["fn"]) == (1, 0, 1)
    assert longitudinal["f1"] == pytest.approx(2 / 3) and longitudinal["n_patients"] == 2
