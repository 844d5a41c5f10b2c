"""Model-assisted annotation: masks out to annotation tools, corrected masks back into training.

    python -m radlogics_repro.annotation export input=DICOM_FOLDER analysis=analysis/CASE out=CASE_seg.dcm
    python -m radlogics_repro.annotation import input=DICOM_FOLDER lung_mask=CASE_seg.dcm \\
        lesion_mask=CASE_seg.dcm manifest=site/manifest.csv case_id=S001_d0 patient_id=S001 split=train

The recipe (data/README.md, "Bring your own data"): ``analyze`` writes lung and infection masks as
NIfTI on the input's own grid (3D Slicer and ITK-SNAP open them over the CT as they are);
:func:`write_dicom_seg` puts the same masks into one DICOM Segmentation object referencing the source
series, for DICOM-based tools (3D Slicer's DICOM module, OHIF, PACS viewers). Annotators correct the
masks; :func:`import_mask` reads a corrected mask (NIfTI or DICOM SEG) back onto the study's canonical
grid after checking that it belongs to it, and :func:`import_case` writes it next to a training
manifest (:func:`add_to_manifest`) that ``python -m radlogics_repro.train ... data=volumes
data.manifest=...`` trains on.

Segments (:data:`SEGMENTS`), coded as the DICOM standard asks (category, property type):

=============  =====================  ========================================  ==========
name           category               property type                             label map
=============  =====================  ========================================  ==========
lung_right     SCT 91723000 Anatomy   SCT 3341006 Right lung                    lung 1
lung_left      SCT 91723000 Anatomy   SCT 44029006 Left lung                    lung 2
ggo            SCT 49755003 Abnormal  DCM 112120 Ground glass opacity           lesion 1
consolidation  SCT 49755003 Abnormal  SCT 95436008 Lung consolidation           lesion 2
=============  =====================  ========================================  ==========

The label maps are the ones the manifest uses (``lung_mask``: 1 right, 2 left; ``lesion_mask``: 1
ground-glass opacity, 2 consolidation). Segments of a SEG made elsewhere are matched to these names by
their property type code, else by their label (``"Right lung"``, ``"GGO"``, ...).

Privacy: a SEG has to name the study it segments (Study Instance UID, Frame of Reference UID) and
the instances it overlays (SOP Instance UIDs); highdicom also copies the source's Patient and Study
modules into it. :func:`write_dicom_seg` then replaces them: every Patient attribute (group 0010)
is removed, Patient's Name and Patient ID are set to a pseudonym, birth date, sex, study date and
time, accession number, study ID and referring physician are left empty (they are Type 2: present,
may be empty), and study description, physicians and institution are removed. Viewers that file
objects by Patient ID therefore list the SEG under the pseudonym, not under the source patient; open
both files explicitly (3D Slicer: load the CT series, then the SEG) or keep them in one folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from nibabel import orientations as nio
from pydicom.dataset import Dataset

from radlogics_repro import RESEARCH_USE_NOTICE, __version__, atomic, io
from radlogics_repro.cli import UserError

log = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
GEOMETRY_TOLERANCE_VOXELS = 0.1
"""A mask matches a study when each of its grid's corner voxel centres lies within this fraction
of a voxel (per axis) of the study's."""
DEFAULT_PSEUDONYM = "ANONYMOUS"
SEG_SERIES_NUMBER = 900
KINDS = ("lung", "lesion")
MANIFEST_BASE_COLUMNS = ("case_id", "patient_id", "split", "image", "lung_mask", "lesion_mask", "label")


class AnnotationError(UserError):
    """A mask or SEG that cannot be exported or imported; one line ``"<file>: <problem>"``."""


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: its name, which label map it belongs to, and its DICOM codes.

    Attributes:
        name: key used in mask dicts and as the SEG's Segment Label.
        kind: "lung" or "lesion" (the manifest's ``lung_mask`` / ``lesion_mask``).
        label: its value in that label map.
        category, property_type: (code value, coding scheme, meaning).
        aliases: other segment labels (lower case) that mean this segment.
        rgb: display colour (0..255).
    """

    name: str
    kind: str
    label: int
    category: tuple[str, str, str]
    property_type: tuple[str, str, str]
    aliases: tuple[str, ...]
    rgb: tuple[int, int, int]


_ANATOMY = ("91723000", "SCT", "Anatomical Structure")
_ABNORMAL = ("49755003", "SCT", "Morphologically Abnormal Structure")
SEGMENTS: dict[str, SegmentSpec] = {s.name: s for s in (
    SegmentSpec("lung_right", "lung", 1, _ANATOMY, ("3341006", "SCT", "Right lung"),
                ("right lung", "lung right", "right_lung", "lung_r", "r lung"), (128, 174, 128)),
    SegmentSpec("lung_left", "lung", 2, _ANATOMY, ("44029006", "SCT", "Left lung"),
                ("left lung", "lung left", "left_lung", "lung_l", "l lung"), (111, 184, 210)),
    SegmentSpec("ggo", "lesion", 1, _ABNORMAL, ("112120", "DCM", "Ground glass opacity"),
                ("ground glass opacity", "ground-glass opacity", "ground_glass_opacity", "gg"),
                (241, 214, 145)),
    SegmentSpec("consolidation", "lesion", 2, _ABNORMAL, ("95436008", "SCT", "Lung consolidation"),
                ("lung consolidation", "con", "cons"), (216, 101, 79)),
)}


# ---------------------------------------------------------------------------------------------
# Masks <-> label maps
# ---------------------------------------------------------------------------------------------


def masks_from_label_maps(lung_labels: np.ndarray | None = None,
                          lesion_labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Split label maps into per-segment bool masks.

    Args:
        lung_labels: (z, y, x) 1 right lung, 2 left lung (as ``analyze`` writes lung_mask.nii.gz).
        lesion_labels: (z, y, x) 1 ground-glass opacity, 2 consolidation (infection_mask.nii.gz).

    Returns:
        ``{segment name: (z, y, x) bool}`` for the label maps given.
    """
    out = {}
    for kind, labels in (("lung", lung_labels), ("lesion", lesion_labels)):
        if labels is None:
            continue
        labels = np.asarray(labels)
        for spec in SEGMENTS.values():
            if spec.kind == kind:
                out[spec.name] = labels == spec.label
    return out


def label_map_from_masks(masks: Mapping[str, np.ndarray], kind: str, source: str = "<masks>"
                         ) -> np.ndarray:
    """Combine the segments of one ``kind`` ("lung" or "lesion") into a uint8 label map.

    Where segments overlap, the higher label wins (left lung over right, consolidation over GGO).

    Raises:
        AnnotationError: no segment of that kind among ``masks``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    specs = sorted((s for s in SEGMENTS.values() if s.kind == kind and s.name in masks),
                   key=lambda s: s.label)
    if not specs:
        wanted = ", ".join(s.name for s in SEGMENTS.values() if s.kind == kind)
        raise AnnotationError(f"{source}: no {kind} segment ({wanted}) among {sorted(masks) or 'none'}")
    shape = np.shape(masks[specs[0].name])
    out = np.zeros(shape, np.uint8)
    for spec in specs:
        out[np.asarray(masks[spec.name], bool)] = spec.label
    return out


# ---------------------------------------------------------------------------------------------
# DICOM SEG
# ---------------------------------------------------------------------------------------------


def write_dicom_seg(
    masks: Mapping[str, np.ndarray],
    study: io.Study,
    out_path: str | os.PathLike,
    *,
    source: str | os.PathLike | Sequence[Dataset] | None = None,
    pseudonym: str = DEFAULT_PSEUDONYM,
    algorithm: str = "AUTOMATIC",
    series_description: str = "radlogics_repro lung and infection masks",
) -> Path:
    """Write masks on a DICOM study's canonical grid as one binary DICOM SEG referencing its series.

    Each mask is mapped back onto the source instances (the flips and axis swaps of
    :func:`radlogics_repro.io.load_study` are undone, see :func:`radlogics_repro.io.to_dicom_frames`);
    every frame of the SEG references the instance it overlays. Empty slices are not stored.

    Privacy: after highdicom has built the object, the patient and study attributes it copied from the
    source are replaced (module docstring): Patient's Name and ID become ``pseudonym``; the study is
    still referenced by its Study Instance UID, as a SEG must.

    Args:
        masks: ``{segment name: (z, y, x) bool/uint8}`` on ``study``'s canonical grid; names from
            :data:`SEGMENTS` (``lung_right``, ``lung_left``, ``ggo``, ``consolidation``).
        study: the study as :func:`radlogics_repro.io.load_study` read it from a DICOM series.
        out_path: the ``.dcm`` file to write (atomically).
        source: where the source instances' headers are read from: None (the files the study was
            read from), a folder, or pydicom datasets; instances are matched by SOPInstanceUID.
        pseudonym: Patient's Name and Patient ID of the SEG (no real identifier).
        algorithm: ``AUTOMATIC`` (model output) or ``MANUAL`` / ``SEMIAUTOMATIC`` (corrected).
        series_description: the SEG series' description.

    Returns:
        ``out_path``.

    Raises:
        AnnotationError: unknown segment name, a mask not on the study's grid, source instances
            missing; ``radlogics_repro.io.StudyReadError`` when the study was not read from DICOM.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    out_path = Path(out_path)
    instances = io.dicom_instances(study)
    unknown = sorted(set(masks) - set(SEGMENTS))
    if unknown:
        raise AnnotationError(f"{out_path}: unknown segment name(s) {unknown}; use {list(SEGMENTS)}")
    if not masks:
        raise AnnotationError(f"{out_path}: no masks to write")
    names = [name for name in SEGMENTS if name in masks]
    frames = []
    for name in names:
        mask = np.asarray(masks[name])
        if mask.shape != study.hu.shape:
            raise AnnotationError(f"{out_path}: mask '{name}' has shape {mask.shape} (z, y, x), the "
                                  f"study {study.source} {study.hu.shape}")
        frames.append(io.to_dicom_frames(study, mask > 0))
    pixels = np.stack(frames, axis=-1).astype(np.uint8)  # (instance, row, column, segment)
    datasets = _source_datasets(instances, source, study.source)

    algorithm = algorithm.upper()
    if algorithm not in ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"):
        raise AnnotationError(f"{out_path}: algorithm {algorithm!r}: use AUTOMATIC, SEMIAUTOMATIC or MANUAL")
    if not pseudonym.strip() or len(pseudonym) > 64 or "\\" in pseudonym:
        raise AnnotationError(f"{out_path}: pseudonym {pseudonym!r}: 1-64 characters, no backslash")
    identification = None
    if algorithm != "MANUAL":
        identification = hd.AlgorithmIdentificationSequence(
            name="radlogics_repro", version=__version__,
            family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"))
    descriptions = []
    for number, name in enumerate(names, start=1):
        spec = SEGMENTS[name]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=hd.sr.CodedConcept(*spec.category),
            segmented_property_type=hd.sr.CodedConcept(*spec.property_type),
            algorithm_type=algorithm, algorithm_identification=identification,
            tracking_uid=generate_uid(), tracking_id=name,
            display_color=hd.color.CIELabColor.from_rgb(*spec.rgb)))
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="radlogics_repro", manufacturer_model_name="radlogics_repro",
        software_versions=__version__, device_serial_number="none",
        content_label="RADLOGICS", content_description=RESEARCH_USE_NOTICE,
        content_creator_name="radlogics_repro^", series_description=series_description,
        omit_empty_frames=bool(pixels.any()))
    pseudonymize(seg, pseudonym)
    leftovers = identifiers_in(seg, datasets[0])
    if leftovers:  # a highdicom change would copy more than pseudonymize() removes
        raise RuntimeError(f"{out_path}: source identifiers left in the SEG: {leftovers}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".tmp-{uuid.uuid4().hex}-{out_path.name}")
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote DICOM SEG %s (%d segments, %d frames)", out_path, len(names),
             int(seg.NumberOfFrames))
    return out_path


_STUDY_TYPE2_EMPTIED = ("StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                        "ReferringPhysicianName")
_STUDY_REMOVED = ("StudyDescription", "PhysiciansOfRecord", "PhysiciansOfRecordIdentificationSequence",
                  "NameOfPhysiciansReadingStudy", "PhysiciansReadingStudyIdentificationSequence",
                  "ReferringPhysicianIdentificationSequence", "IssuerOfAccessionNumberSequence",
                  "AdmittingDiagnosesDescription", "AdmittingDiagnosesCodeSequence",
                  "RequestingService", "ReferencedPatientSequence", "ReferencedStudySequence")
_SITE_REMOVED = ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                 "InstitutionalDepartmentTypeCodeSequence", "StationName", "OperatorsName",
                 "OperatorIdentificationSequence", "PerformingPhysicianName")
"""Removed at every level: highdicom lists the source scanner as contributing equipment."""


def pseudonymize(ds: Dataset, pseudonym: str = DEFAULT_PSEUDONYM) -> Dataset:
    """Replace the patient, study and site attributes of a derived object (in place; see the module
    docstring): group 0010 removed, then name and ID set to ``pseudonym`` and birth date and sex
    empty; study date/time, accession number, study ID and referring physician emptied; study
    description and physicians removed; institution, station and operators removed everywhere
    (also from the contributing-equipment items, with the source scanner's serial number). UIDs
    are kept."""
    for element in list(ds):
        if element.tag.group in (0x0010, 0x0032):
            del ds[element.tag]
    ds.PatientName = pseudonym if "^" in pseudonym else f"{pseudonym}^"  # family name component
    ds.PatientID = pseudonym
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    for keyword in _STUDY_TYPE2_EMPTIED:
        setattr(ds, keyword, "")
    for keyword in _STUDY_REMOVED:
        if keyword in ds:
            delattr(ds, keyword)
    _remove_everywhere(ds, _SITE_REMOVED)
    for item in ds.get("ContributingEquipmentSequence", []):
        if "DeviceSerialNumber" in item:
            del item.DeviceSerialNumber
    return ds


def _remove_everywhere(ds: Dataset, keywords: Sequence[str]) -> None:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _remove_everywhere(item, keywords)


def identifiers_in(ds: Dataset, source: Dataset) -> list[str]:
    """Keywords of elements of ``ds`` (recursively) whose text contains the source's patient name,
    patient ID or birth date, or an institution or accession number of the source."""
    secrets = set()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                    "InstitutionName", "AccessionNumber"):
        value = str(source.get(keyword, "") or "").strip()
        if len(value) >= 3:
            secrets.add(value)
    found = []

    def visit(dataset: Dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    visit(item)
            elif element.VR not in ("OB", "OW", "OF", "OD", "UN") and element.value is not None:
                text = str(element.value)
                if any(secret in text for secret in secrets):
                    found.append(element.keyword or str(element.tag))

    visit(ds)
    return found


def _source_datasets(instances: list[tuple[str, str]], source, where: str) -> list[Dataset]:
    """The source instances' headers in the study's slice order."""
    if source is None:
        return [_read_dicom_header(path) for _, path in instances]
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise AnnotationError(f"{folder}: source DICOM folder not found")
        by_uid = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # not DICOM: skipped, as load_study does
                continue
            by_uid[str(ds.get("SOPInstanceUID", ""))] = ds
        where = str(folder)
    else:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in source}
    missing = [uid for uid, _ in instances if uid not in by_uid]
    if missing:
        raise AnnotationError(f"{where}: {len(missing)} of the study's {len(instances)} source "
                              "instances are not there (another series?)")
    return [by_uid[uid] for uid, _ in instances]


def _read_dicom_header(path: str | os.PathLike) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as err:
        raise AnnotationError(f"{path}: cannot read the source DICOM instance ({err})") from None


def read_dicom_seg(seg_path: str | os.PathLike, study: io.Study) -> dict[str, np.ndarray]:
    """Read a DICOM SEG of ``study`` back onto the study's canonical (z, y, x) grid.

    Every instance the SEG references must be one of the study's (checked by SOPInstanceUID), and
    its frames must have the study's rows and columns. Segments are named as in :data:`SEGMENTS`
    when their property type code or label matches one (segments with the same name are merged);
    others keep their Segment Label. Slices the SEG does not cover are empty.

    Returns:
        ``{segment name: (z, y, x) bool}``.

    Raises:
        AnnotationError: not a readable DICOM SEG, references instances outside the study, or has
            another frame size; ``radlogics_repro.io.StudyReadError`` for a study not read from DICOM.
    """
    import highdicom as hd

    seg_path = Path(seg_path)
    instances = io.dicom_instances(study)
    if not seg_path.is_file():
        raise AnnotationError(f"{seg_path}: does not exist")
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as err:  # pydicom/highdicom raise many types for non-SEG or damaged files
        raise AnnotationError(f"{seg_path}: not a readable DICOM SEG ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]})") from None
    study_uids = [uid for uid, _ in instances]
    referenced = {str(sop) for _, _, sop in seg.get_source_image_uids()}
    if not referenced:
        raise AnnotationError(f"{seg_path}: references no source instances; cannot place it on "
                              f"the study {study.source}")
    foreign = referenced - set(study_uids)
    if foreign:
        raise AnnotationError(
            f"{seg_path}: references {len(foreign)} of its {len(referenced)} source instances "
            f"outside the study {study.source} (a SEG of another series or study?)")
    frames_shape = io.to_dicom_frames(study, np.zeros(study.hu.shape, bool)).shape
    if (int(seg.Rows), int(seg.Columns)) != frames_shape[1:]:
        raise AnnotationError(f"{seg_path}: frames of {seg.Rows} x {seg.Columns} pixels, the study "
                              f"{study.source} has {frames_shape[1]} x {frames_shape[2]}")
    numbers = list(seg.get_segment_numbers())
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=study_uids, segment_numbers=numbers, combine_segments=False,
        assert_missing_frames_are_empty=True)  # (instance, row, column, segment)
    out: dict[str, np.ndarray] = {}
    for index, number in enumerate(numbers):
        name = segment_name(seg.get_segment_description(number))
        mask = io.from_dicom_frames(study, pixels[..., index] >= 0.5)
        out[name] = out[name] | mask if name in out else mask
    return out


def segment_name(description) -> str:
    """The :data:`SEGMENTS` name of a SEG segment description (by property type code, then by
    label), else its Segment Label."""
    code = description.get("SegmentedPropertyTypeCodeSequence")
    if code:
        key = (str(code[0].CodeValue), str(code[0].CodingSchemeDesignator))
        for spec in SEGMENTS.values():
            if key == spec.property_type[:2]:
                return spec.name
    label = str(description.get("SegmentLabel", "") or "").strip()
    lowered = label.lower()
    for spec in SEGMENTS.values():
        if lowered == spec.name or lowered in spec.aliases:
            return spec.name
    return label or f"segment_{description.SegmentNumber}"


# ---------------------------------------------------------------------------------------------
# Importing corrected masks
# ---------------------------------------------------------------------------------------------


def import_mask(mask_path: str | os.PathLike, study: io.Study, kind: str) -> np.ndarray:
    """A corrected mask of ``study`` (NIfTI or DICOM SEG) as a uint8 label map on its canonical grid.

    NIfTI: any axis order/orientation; after reorientation its grid must be the study's (shape,
    spacing, orientation and position, each corner voxel within :data:`GEOMETRY_TOLERANCE_VOXELS` of
    a voxel), values whole numbers 0..255 (the manifest's labels: lung 1 right / 2 left, lesion 1
    GGO / 2 consolidation; any value > 0 counts as lung or lesion in training). DICOM SEG: see
    :func:`read_dicom_seg`; the segments of ``kind`` are combined with :func:`label_map_from_masks`.

    Args:
        kind: "lung" or "lesion" (which segments of a SEG to take).

    Returns:
        (z, y, x) uint8 labels.

    Raises:
        AnnotationError: one line naming the file and what does not match, e.g. ``mask.nii.gz:
            spacing (2.5, 0.7, 0.7) mm (z, y, x) does not match the study's (1.25, 0.7, 0.7) mm``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    mask_path = Path(mask_path)
    if not mask_path.exists():
        raise AnnotationError(f"{mask_path}: does not exist")
    name = mask_path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return _import_nifti_mask(mask_path, study)
    return label_map_from_masks(read_dicom_seg(mask_path, study), kind, str(mask_path))


def _import_nifti_mask(path: Path, study: io.Study) -> np.ndarray:
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as err:  # nibabel raises many types for damaged files
        raise AnnotationError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err})") from None
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise AnnotationError(f"{path}: not a 3D mask (shape {shape})")
    affine = np.asarray(img.affine, np.float64)
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(io.CANONICAL_AXCODES))
    canonical_affine = affine @ nio.inv_ornt_aff(transform, shape[:3])
    canonical_xyz = [0, 0, 0]
    for axis, (target, _) in enumerate(transform):
        canonical_xyz[int(target)] = shape[axis]
    check_grid(tuple(canonical_xyz[::-1]), canonical_affine, study, path)
    data = np.asarray(img.dataobj).reshape(shape[:3])
    labels = np.ascontiguousarray(nio.apply_orientation(data, transform).transpose(2, 1, 0))
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels)):
            raise AnnotationError(f"{path}: values are not whole-number labels (a probability map?); "
                                  "save the corrected mask as labels")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise AnnotationError(f"{path}: label values {labels.min()}..{labels.max()} outside 0..255")
    return labels.astype(np.uint8)


def check_grid(shape_zyx: tuple[int, int, int], affine: np.ndarray, study: io.Study,
               path: str | os.PathLike) -> None:
    """Raise :class:`AnnotationError` when a canonical grid (shape, voxel (x, y, z) -> RAS affine)
    is not the study's: every difference in shape, spacing, orientation or position is named."""
    problems = []
    study_shape = tuple(int(s) for s in study.hu.shape)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[::-1]  # (z, y, x) mm
    study_spacing = np.linalg.norm(study.affine[:3, :3], axis=0)[::-1]
    extent = np.maximum(np.array(study_shape) - 1, 1)
    if np.any(np.abs(spacing - study_spacing) * extent > GEOMETRY_TOLERANCE_VOXELS * study_spacing):
        problems.append(f"spacing {_mm(spacing)} mm (z, y, x) does not match the study's "
                        f"{_mm(study_spacing)} mm")
    if tuple(shape_zyx) != study_shape:
        problems.append(f"grid {' x '.join(map(str, shape_zyx))} voxels (z, y, x) does not match the "
                        f"study's {' x '.join(map(str, study_shape))}")
    if not problems:
        directions = affine[:3, :3] / spacing[::-1]
        study_directions = study.affine[:3, :3] / study_spacing[::-1]
        cosines = np.clip(np.sum(directions * study_directions, axis=0), -1.0, 1.0)
        angle = float(np.degrees(np.max(np.arccos(cosines))))
        corners = np.array([[x, y, z, 1.0] for x in (0, shape_zyx[2] - 1)
                            for y in (0, shape_zyx[1] - 1) for z in (0, shape_zyx[0] - 1)]).T
        offset_mm = (affine @ corners - study.affine @ corners)[:3]
        offset_voxels = np.abs(np.linalg.solve(study.affine[:3, :3], offset_mm))
        if np.max(offset_voxels) > GEOMETRY_TOLERANCE_VOXELS:
            if angle > 0.01:
                problems.append(f"orientation differs from the study's by {angle:.2g} degrees")
            else:
                shift = float(np.linalg.norm(offset_mm[:, 0]))
                problems.append(f"position is {shift:.3g} mm ({np.max(offset_voxels):.2g} voxels) "
                                "away from the study's grid")
    if problems:
        raise AnnotationError(f"{path}: {'; '.join(problems)} ({study.source})")


def _mm(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"


# ---------------------------------------------------------------------------------------------
# Training manifest
# ---------------------------------------------------------------------------------------------


def add_to_manifest(
    manifest_path: str | os.PathLike,
    *,
    case_id: str,
    patient_id: str,
    split: str,
    image: str | os.PathLike,
    lung_mask: str | os.PathLike | None = None,
    lesion_mask: str | os.PathLike | None = None,
    label: int | None = None,
    extra: Mapping[str, object] | None = None,
    replace: bool = False,
) -> Path:
    """Append one case to a training manifest CSV (created if missing), atomically.

    Columns are those of :func:`radlogics_repro.data.read_manifest` (``case_id, patient_id, split,
    image, lung_mask, lesion_mask, label``; an existing manifest keeps its other columns, ``extra``
    may fill them or add new ones). Paths inside the manifest's folder are stored relative to it,
    others absolute.

    Args:
        label: case label (1 COVID-19 findings); default: 1 when the lesion mask has any lesion
            voxel, 0 when it has none, empty without a lesion mask.
        replace: replace a row with the same ``case_id`` instead of refusing.

    Raises:
        AnnotationError: the case id is already there (and not ``replace``), a path does not
            exist, or the patient would end up in two splits.
    """
    from radlogics_repro import data

    manifest_path = Path(manifest_path)
    if split not in data.SPLITS:
        raise AnnotationError(f"{manifest_path}: split {split!r}: use one of {list(data.SPLITS)}")
    if manifest_path.exists():
        frame = pd.read_csv(manifest_path, dtype={"case_id": str, "patient_id": str, "split": str})
    else:
        frame = pd.DataFrame(columns=list(MANIFEST_BASE_COLUMNS))
    if str(case_id) in set(frame["case_id"].astype(str)):
        if not replace:
            raise AnnotationError(f"{manifest_path}: case {case_id} is already listed (replace=true "
                                  "to replace it)")
        frame = frame[frame["case_id"].astype(str) != str(case_id)]
    if label is None and lesion_mask is not None:
        label = int(np.any(np.asarray(nib.load(str(lesion_mask)).dataobj) > 0))
    row = {"case_id": str(case_id), "patient_id": str(patient_id), "split": split,
           "image": _manifest_path(image, manifest_path),
           "lung_mask": _manifest_path(lung_mask, manifest_path) if lung_mask else "",
           "lesion_mask": _manifest_path(lesion_mask, manifest_path) if lesion_mask else "",
           "label": "" if label is None else int(label), **dict(extra or {})}
    frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
    try:
        data.check_patient_splits(frame, source=manifest_path)
    except data.DatasetError as err:
        raise AnnotationError(str(err)) from None
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(manifest_path, frame.to_csv(index=False))
    return manifest_path


def _manifest_path(path: str | os.PathLike, manifest_path: Path) -> str:
    full = Path(path).expanduser().resolve()
    if not full.exists():
        raise AnnotationError(f"{path}: does not exist")
    try:
        return str(full.relative_to(manifest_path.parent.resolve()))
    except ValueError:
        return str(full)


def import_case(
    image: str | os.PathLike,
    manifest_path: str | os.PathLike,
    *,
    case_id: str,
    patient_id: str,
    split: str,
    lung_mask: str | os.PathLike | None = None,
    lesion_mask: str | os.PathLike | None = None,
    label: int | None = None,
    replace: bool = False,
) -> Path:
    """Check corrected masks of one study and add them to a training manifest.

    Each mask (NIfTI or DICOM SEG) is read with :func:`import_mask` (geometry checked against the
    study) and written as ``<manifest folder>/masks/<case_id>_lung.nii.gz`` /
    ``..._lesion.nii.gz`` on the input's own grid, which the training loader reads; then
    :func:`add_to_manifest` lists the case with ``image`` pointing at the study.

    Returns:
        The manifest path.
    """
    if lung_mask is None and lesion_mask is None:
        raise AnnotationError(f"{image}: give lung_mask and/or lesion_mask to import")
    if Path(case_id).name != case_id or case_id in ("", ".", "..") or case_id.startswith("."):
        raise AnnotationError(f"{manifest_path}: case_id {case_id!r} must be a plain name (files are "
                              "named after it)")
    manifest_path = Path(manifest_path)
    study = io.load_study(image)
    folder = manifest_path.parent / "masks"
    written = {}
    for kind, path in (("lung", lung_mask), ("lesion", lesion_mask)):
        if path is None:
            continue
        labels = import_mask(path, study, kind)
        if not labels.any():
            log.warning("%s: the %s mask is empty", path, kind)
        written[kind] = io.save_mask(study, labels, folder / f"{case_id}_{kind}.nii.gz")
    return add_to_manifest(manifest_path, case_id=case_id, patient_id=patient_id, split=split,
                           image=image, lung_mask=written.get("lung"),
                           lesion_mask=written.get("lesion"), label=label, replace=replace)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

_USAGE = """\
python -m radlogics_repro.annotation export input=DICOM_FOLDER (analysis=CASE_FOLDER | lung_mask=NIFTI \
[infection_mask=NIFTI]) out=FILE.dcm [pseudonym=NAME] [algorithm=AUTOMATIC|MANUAL]
python -m radlogics_repro.annotation import input=STUDY manifest=CSV case_id=ID patient_id=ID \
split=train|val|test [lung_mask=NIFTI|SEG] [lesion_mask=NIFTI|SEG] [label=0|1] [replace=true]"""

_KEYS = {
    "export": {"input", "analysis", "lung_mask", "infection_mask", "out", "pseudonym", "algorithm"},
    "import": {"input", "manifest", "case_id", "patient_id", "split", "lung_mask", "lesion_mask",
               "label", "replace"},
}
_REQUIRED = {"export": {"input", "out"}, "import": {"input", "manifest", "case_id", "patient_id",
                                                    "split"}}


def parse_arguments(argv: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``[export|import] key=value ...`` -> (command, settings); AnnotationError on bad input."""
    parser = argparse.ArgumentParser(prog="python -m radlogics_repro.annotation", usage=_USAGE,
                                     description=__doc__.split("\n\n")[2].strip())
    parser.add_argument("command", choices=sorted(_KEYS))
    parser.add_argument("settings", nargs="*", metavar="key=value")
    args = parser.parse_args(list(argv))
    settings = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS[args.command]:
            raise AnnotationError(f"{args.command}: unknown setting {item!r}; use "
                                  f"{', '.join(sorted(_KEYS[args.command]))}")
        settings[key] = value
    missing = sorted(_REQUIRED[args.command] - set(settings))
    if missing:
        raise AnnotationError(f"{args.command}: missing {', '.join(missing)}; usage: "
                              f"{_USAGE.splitlines()[0 if args.command == 'export' else 1]}")
    return args.command, settings


def run_export(settings: Mapping[str, str]) -> Path:
    """``export``: the analysis (or given) NIfTI masks of a DICOM study -> one DICOM SEG."""
    study = io.load_study(settings["input"])
    if study.metadata.get("source_kind") != "dicom":
        raise AnnotationError(f"{settings['input']}: a DICOM SEG needs a DICOM series as input; for a "
                              "NIfTI input open the NIfTI masks with it in 3D Slicer or ITK-SNAP")
    folder = Path(settings["analysis"]) if settings.get("analysis") else None
    lung_path = settings.get("lung_mask") or (folder / "lung_mask.nii.gz" if folder else None)
    lesion_path = settings.get("infection_mask") or (folder / "infection_mask.nii.gz" if folder else None)
    if lung_path is None and lesion_path is None:
        raise AnnotationError(f"{settings['input']}: give analysis=CASE_FOLDER or lung_mask=/infection_mask=")
    lung = io.load_mask(lung_path, study) if lung_path else None
    lesion = io.load_mask(lesion_path, study) if lesion_path else None
    masks = masks_from_label_maps(lung, lesion)
    return write_dicom_seg(masks, study, settings["out"],
                           pseudonym=settings.get("pseudonym", DEFAULT_PSEUDONYM),
                           algorithm=settings.get("algorithm", "AUTOMATIC"))


def run_import(settings: Mapping[str, str]) -> Path:
    """``import``: corrected masks of one study -> NIfTI beside the manifest + a manifest row."""
    label = settings.get("label")
    return import_case(
        settings["input"], settings["manifest"], case_id=settings["case_id"],
        patient_id=settings["patient_id"], split=settings["split"],
        lung_mask=settings.get("lung_mask") or None, lesion_mask=settings.get("lesion_mask") or None,
        label=None if label in (None, "") else int(label),
        replace=settings.get("replace", "false").lower() in ("1", "true", "yes"))


def main(argv: Sequence[str] | None = None) -> None:
    from radlogics_repro.cli import exit_on_user_error

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # one INFO line per copied module
    with exit_on_user_error():
        command, settings = parse_arguments(sys.argv[1:] if argv is None else argv)
        if command == "export":
            print(f"wrote {run_export(settings)}")
        else:
            print(f"added {settings['case_id']} to {run_import(settings)}")
        print(RESEARCH_USE_NOTICE)


if __name__ == "__main__":
    main()
