"""Read chest-CT studies (DICOM series or NIfTI) into a canonical HU volume; write masks back.

Every volume handed to the rest of the package is a :class:`Study`: ``hu`` is a float32 array
indexed (z, y, x) in Hounsfield units, in the canonical orientation of the shared conventions
(x index toward the patient's Left, y toward Posterior, z toward Superior; nibabel axis codes
('L', 'P', 'S') for the voxel axes (x, y, z)), and ``affine`` maps voxel (x, y, z, 1) to RAS+
millimetres. :func:`save_mask` writes a canonical mask back as NIfTI in the *input's own* voxel
grid and header, so it overlays the input in 3D Slicer and ITK-SNAP; :func:`load_mask` reads
such a mask (or any NIfTI mask on the study's grid) back into the canonical grid.

Inputs accepted by :func:`load_study`
-------------------------------------
* a folder of DICOM files (searched recursively; ``.dcm`` extension optional);
* a single DICOM file (a 1-slice study; call :func:`require_volume` when a volume is needed);
* a NIfTI file (``.nii`` / ``.nii.gz``), reoriented to canonical with nibabel.

DICOM folder rules: headers are read first (``stop_before_pixels``), pixel data only for the
chosen series. Only CT Image Storage instances with Modality CT (or no Modality) are kept;
localizers (ImageType contains LOCALIZER) and single non-axial images (scouts) are dropped.
Instances are grouped by SeriesInstanceUID and orientation; the axial series with the most slices
is chosen. Slices are sorted by ImagePositionPatient projected on the slice normal (row cosine x
column cosine); the z spacing is the median distance between consecutive slice positions (never
SliceThickness). Stored values are rescaled with each slice's RescaleSlope/RescaleIntercept.

Bad input: errors and warnings
------------------------------
Errors raise :class:`StudyReadError` with a one-line message ``"<path>: <problem>"``. Warnings
are logged and appended to ``study.metadata["warnings"]``; the study is still returned.

=======================================================  =======  ===============================
Case                                                     Outcome  Message (path named: key words)
=======================================================  =======  ===============================
path does not exist                                      error    path: does not exist
empty folder                                             error    folder: empty folder
folder without any DICOM file                            error    folder: no DICOM files found
single file that is neither DICOM nor .nii/.nii.gz       error    file: not a DICOM or NIfTI
non-DICOM files next to DICOM files                      skipped  debug log only
file that cannot be opened or read (permissions, I/O)    error    file: cannot read file
DICM-marked file that cannot be parsed, or a CT image    error    file: truncated or corrupt
  whose header or Pixel Data is cut short
no CT image (all MR, SR, DICOMDIR, ...)                  error    folder: no CT images + the
                                                                    modalities found
only Enhanced / Legacy-converted (multi-frame) CT        error    folder: not supported
Enhanced CT next to classic CT images                    warning  ignored, counted
only localizer images                                    error    folder: only localizer
CT image without position/orientation/spacing/size:
  in the chosen series (or no placeable image at all)    error    file: missing or invalid <tag>
  in another series                                      warning  ignored, file named
compressed pixel data that cannot be decoded             error    file: transfer syntax name +
                                                                    pip install hint
only coronal / sagittal series (single images = scouts)  error    folder: no axial CT series
several orientations inside the chosen series            error    folder + both file names
Rows/Columns or PixelSpacing differ inside the series    error    folder + both file names
a slice step > 1.5 x the median step (missing slices)    error    folder: positions + files
slice positions imply a gantry tilt > 30 degrees         error    folder: tilt angle
single slice where a volume is needed (require_volume)   error    source: single slice
several series (choice logged at INFO)                   warning  chosen series + the others
duplicate instances (same SOPInstanceUID or position)    warning  number dropped
uneven slice steps, all <= 1.5 x median                  warning  min/max step; median used
gantry tilt 0.05 .. 30 degrees                           warning  tilt angle; sheared affine
HU min > -500 (missing rescale?) or HU max > 5000        warning  HU range
NIfTI unreadable or gzip stream truncated                error    file: unreadable NIfTI
NIfTI not 3-D (a 4th axis of length 1 is accepted)       error    file: not a 3D volume
NIfTI affine singular or not finite                      error    file: invalid NIfTI affine
NIfTI voxels NaN or infinite (e.g. outside the FOV)      warning  count; set to -1000 HU (air)
load_mask: mask grid differs from the study's grid       error    file: does not match
=======================================================  =======  ===============================

Gantry tilt: the slice positions of a tilted acquisition move in-plane from slice to slice. The
affine then keeps that shear in its z column (the slices are not resampled), which the NIfTI
sform holds exactly (the qform stores the nearest unsheared transform). ``Study.spacing[0]`` is the
perpendicular distance between slice planes, so ``prod(spacing)`` is still the voxel volume.
Tilts below 0.05 degrees are treated as rounding noise and dropped; tilts above 30 degrees (beyond
any CT gantry) are refused.

Privacy: ``Study.metadata`` holds only non-identifying fields (no names, IDs, birth dates,
institutions, accession numbers or dates); Study/Series Instance UIDs are kept only as the first
16 hex characters of their SHA-256. A DICOM study also keeps, in memory only, its instances'
SOPInstanceUIDs and files (:func:`dicom_instances`), which a DICOM SEG must reference.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from nibabel import orientations as nio
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
_MULTIFRAME_CT = {ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}

CANONICAL_AXCODES = ("L", "P", "S")
_CANONICAL_ORNT = nio.axcodes2ornt(CANONICAL_AXCODES)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

GAP_FACTOR = 1.5  # a slice step larger than this times the median step = missing slices
UNEVEN_REL_TOL = 0.01  # steps deviating more than 1 % (and > 0.01 mm) from the median: warning
UNEVEN_ABS_TOL_MM = 0.01
DUPLICATE_POSITION_TOL_MM = 0.01
ORIENTATION_TOL = 1e-3  # direction cosines
SPACING_TOL_MM = 1e-3
TILT_IGNORE_DEG = 0.05
TILT_MAX_DEG = 30.0
HU_MIN_IMPLAUSIBLE = -500.0  # a CT volume with min HU above this has no air: missing rescale?
HU_MAX_IMPLAUSIBLE = 5000.0
STORED_INTERCEPT = -1024.0  # RescaleIntercept used by write_dicom_series
NON_FINITE_HU = -1000.0  # NaN/infinite NIfTI voxels are read as air
_FAST_TRANSFER_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian}
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


class StudyReadError(ValueError):
    """Unreadable or unsuitable study input; the message is one line: ``"<path>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str | None = None):
        if problem is None:  # StudyReadError("<path>: <problem>") also works
            path, _, problem = str(path).partition(": ")
        self.path = str(path)
        self.problem = _one_line(problem)
        super().__init__(f"{self.path}: {self.problem}" if self.problem else self.path)


# --------------------------------------------------------------------------------------------
# Study
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _NiftiGrid:
    """What is needed to write a canonical array back into a NIfTI input's own grid."""

    shape: tuple[int, ...]  # full original shape, e.g. (x, y, z) or (x, y, z, 1)
    affine: np.ndarray  # original voxel -> RAS affine
    header: Any  # copy of the original nibabel header (sform/qform codes, pixdim, units)
    image_class: type  # nib.Nifti1Image or nib.Nifti2Image
    to_canonical: np.ndarray  # nibabel ornt transform original (x,y,z) -> canonical (x,y,z)


@dataclass(eq=False)
class _DicomGrid:
    """The DICOM instances behind a Study's slices, to map canonical arrays back onto them.

    Held in memory only (never written by this module): DICOM SEG export must reference them.
    """

    sop_instance_uids: tuple[str, ...]  # one per stored slice, sorted along the slice normal
    files: tuple[str, ...]  # the instance files, same order
    to_canonical: np.ndarray  # nibabel ornt transform stored (column, row, slice) -> canonical


@dataclass(eq=False)
class Study:
    """A CT volume in canonical orientation.

    Attributes:
        hu: float32 array (z, y, x) in Hounsfield units, canonical LPS orientation.
        affine: (4, 4) float64, voxel (x, y, z, 1) -> RAS+ mm, for ``hu``.
        metadata: non-identifying fields only (see module docstring); always has "warnings".
        source: the path the study was read from (or "<array>").
    """

    hu: np.ndarray
    affine: np.ndarray
    metadata: dict = field(default_factory=dict)
    source: str = "<array>"
    _nifti_grid: _NiftiGrid | None = field(default=None, repr=False)
    _dicom_grid: _DicomGrid | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"Study.hu must be 3-D (z, y, x), got shape {self.hu.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"Study.affine must be 4x4, got shape {self.affine.shape}")
        self.metadata.setdefault("warnings", [])

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing (z, y, x) in mm from the affine.

        x and y are the column norms; z is the perpendicular distance between slice planes
        (equal to the z column norm unless the affine is sheared by a gantry tilt).
        """
        a = self.affine[:3, :3]
        sx, sy, sz = (float(v) for v in np.linalg.norm(a, axis=0))
        in_plane = np.cross(a[:, 0], a[:, 1])
        norm = float(np.linalg.norm(in_plane))
        if norm > 0 and abs(float(in_plane @ a[:, 2])) < sz * norm * (1 - 1e-12):  # sheared
            sz = abs(float(in_plane @ a[:, 2])) / norm
        return (sz, sy, sx)

    @property
    def pixel_area_mm2(self) -> float:
        """Area of one in-plane pixel in mm^2 (spacing y * spacing x)."""
        _, sy, sx = self.spacing
        return sy * sx

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel in mm^3 (product of the spacing)."""
        sz, sy, sx = self.spacing
        return sz * sy * sx


def canonical_affine(spacing: Sequence[float], origin_lps: Sequence[float] = (0.0, 0.0, 0.0)):
    """Affine (voxel (x, y, z, 1) -> RAS mm) of a canonical LPS grid.

    Args:
        spacing: (z, y, x) in mm.
        origin_lps: LPS position in mm of voxel (x=0, y=0, z=0).
    """
    sz, sy, sx = (float(s) for s in spacing)
    ox, oy, oz = (float(o) for o in origin_lps)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = (-ox, -oy, oz)
    return affine


def study_from_array(
    hu: np.ndarray,
    spacing: Sequence[float],
    origin_lps: Sequence[float] = (0.0, 0.0, 0.0),
    metadata: dict | None = None,
    source: str = "<array>",
) -> Study:
    """Build a Study from a canonical (z, y, x) HU array.

    Args:
        hu: (z, y, x) array, canonical LPS orientation; converted to float32.
        spacing: (z, y, x) voxel size in mm, all > 0.
        origin_lps: LPS position (mm) of voxel (0, 0, 0).
        metadata: optional extra metadata (copied); "source_kind" defaults to "array".
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D (z, y, x), got shape {hu.shape}")
    if len(spacing) != 3 or min(float(s) for s in spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive values (z, y, x) in mm, got {spacing}")
    meta = {"source_kind": "array", "n_slices": int(hu.shape[0]), "warnings": []}
    meta.update(dict(metadata or {}))
    return Study(hu=hu, affine=canonical_affine(spacing, origin_lps), metadata=meta, source=source)


def require_volume(study: Study, min_slices: int = 2) -> Study:
    """Return ``study`` if it has at least ``min_slices`` slices, else raise StudyReadError."""
    n = int(study.hu.shape[0])
    if n < min_slices:
        what = "single slice (1 image)" if n == 1 else f"only {n} slices"
        raise StudyReadError(
            study.source, f"{what}; a volume of at least {min_slices} slices is needed"
        )
    return study


def dicom_instances(study: Study) -> list[tuple[str, str]]:
    """(SOPInstanceUID, file) of the DICOM instance behind each stored slice, in the order of
    :func:`to_dicom_frames`.

    Raises:
        StudyReadError: the study was not read from a DICOM series.
    """
    if study._dicom_grid is None:
        raise StudyReadError(study.source, "not read from a DICOM series (no source instances)")
    grid = study._dicom_grid
    return list(zip(grid.sop_instance_uids, grid.files, strict=True))


def to_dicom_frames(study: Study, volume: np.ndarray) -> np.ndarray:
    """A canonical (z, y, x) array in the source series' own layout: (instance, row, column).

    Frame k overlays the instance ``dicom_instances(study)[k]`` pixel for pixel (the flips and
    axis swaps :func:`load_study` applied are undone).
    """
    volume = np.asarray(volume)
    if volume.shape != study.hu.shape:
        raise ValueError(f"volume shape {volume.shape} does not match study.hu shape {study.hu.shape}")
    dicom_instances(study)  # raises for a non-DICOM study
    inverse = _invert_ornt(study._dicom_grid.to_canonical)
    stored = nio.apply_orientation(volume.transpose(2, 1, 0), inverse)
    return np.ascontiguousarray(stored.transpose(2, 1, 0))


def from_dicom_frames(study: Study, frames: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_dicom_frames`: (instance, row, column) frames -> canonical (z, y, x)."""
    frames = np.asarray(frames)
    dicom_instances(study)
    canonical = nio.apply_orientation(frames.transpose(2, 1, 0), study._dicom_grid.to_canonical)
    canonical = np.ascontiguousarray(canonical.transpose(2, 1, 0))
    if canonical.shape != study.hu.shape:
        raise ValueError(f"frames of shape {frames.shape} do not make the study's {study.hu.shape}")
    return canonical


# --------------------------------------------------------------------------------------------
# load_study
# --------------------------------------------------------------------------------------------


def load_study(path: str | os.PathLike) -> Study:
    """Read a DICOM folder, a single DICOM file or a NIfTI file into a canonical Study.

    Raises:
        StudyReadError: for every unreadable or unsuitable input (see the module table).
    """
    path = Path(path)
    if not path.exists():
        raise StudyReadError(path, "does not exist")
    if path.is_dir():
        return _load_dicom_folder(path)
    if _is_nifti_name(path):
        return _load_nifti(path)
    header = _read_header(path)
    if header is None:
        raise StudyReadError(path, "not a DICOM or NIfTI file")
    return _study_from_headers([header], path, n_files=1)


def _is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


# ---- DICOM headers --------------------------------------------------------------------------


@dataclass(eq=False)
class _Header:
    """Header fields of one DICOM instance (pixel data not read)."""

    path: Path
    ds: Dataset
    sop_class: str
    sop_uid: str
    series_uid: str
    modality: str
    image_type: tuple[str, ...]
    instance_number: int | None
    transfer_syntax: str
    pixel_offset: int | None  # file offset of the Pixel Data value (native data only)
    pixel_length: int | None  # value length in bytes (None: no Pixel Data element found)
    ipp: np.ndarray | None  # ImagePositionPatient (3,), LPS mm; None if missing/invalid
    iop: np.ndarray | None  # ImageOrientationPatient (6,): row cosine, column cosine
    pixel_spacing: np.ndarray | None  # PixelSpacing (2,): row spacing, column spacing, mm
    rows: int | None
    cols: int | None
    slope: float
    intercept: float
    pixel_format: tuple[int, int, int, int, int]  # BitsAllocated, BitsStored,
    # PixelRepresentation, SamplesPerPixel, NumberOfFrames

    @property
    def is_ct_image(self) -> bool:
        if self.sop_class == CT_IMAGE_STORAGE:
            return self.modality in ("CT", "")  # some anonymisers drop Modality
        return self.sop_class == "" and self.modality == "CT"

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A DICOM dataset without preamble starts with a group 0x0002 or 0x0008 tag."""
    return len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3:4] == b"\x00"


def _looks_like_uid(value) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and all(c.isdigit() or c == "." for c in text)


def _read_header(path: Path) -> _Header | None:
    """Parse the header of ``path``; None if it is not DICOM (raises if DICOM but corrupt)."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
            has_marker = len(head) == 132 and head[128:132] == b"DICM"
            if not has_marker and not _looks_like_raw_dicom(head):
                return None
            fp.seek(0)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_marker)
                for w in caught:
                    logger.debug("%s: pydicom: %s", path, w.message)
                    if has_marker and "end of file" in str(w.message).lower():
                        raise EOFError(str(w.message))
                if not has_marker and not _looks_like_uid(_raw_string(ds, "SOPClassUID")):
                    logger.debug("%s: skipped, no DICM marker and no SOP Class UID", path)
                    return None
                pixel_offset, pixel_length = _locate_pixel_data(fp, ds)
            except Exception as err:  # pydicom raises many types on damaged input
                if has_marker:
                    raise StudyReadError(
                        path, f"not a DICOM file (truncated or corrupt: {err})"
                    ) from err
                logger.debug("%s: skipped, not parseable as DICOM (%s)", path, err)
                return None
            file_size = os.fstat(fp.fileno()).st_size
    except OSError as err:
        raise StudyReadError(path, f"cannot read file ({err.strerror or err})") from err

    try:
        header = _header_fields(path, ds, pixel_offset, pixel_length)
    except Exception as err:  # a value pydicom cannot convert
        if has_marker:
            raise StudyReadError(path, f"not a DICOM file (corrupt header: {err})") from err
        return None
    if has_marker:
        _check_complete(header, file_size)
    return header


# Tags read for every file. Their values are parsed from the raw bytes (ASCII numbers, UIDs, code
# strings, US integers), which is several times faster than pydicom's validated conversion.
_TAG = {
    "ImageType": 0x00080008,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "Modality": 0x00080060,
    "SeriesInstanceUID": 0x0020000E,
    "InstanceNumber": 0x00200013,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "SamplesPerPixel": 0x00280002,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "PixelSpacing": 0x00280030,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "PixelRepresentation": 0x00280103,
    "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053,
}


def _raw_strings(ds: Dataset, keyword: str) -> list[str]:
    """Values of a text attribute (UI, CS, DS, IS) without pydicom's value conversion."""
    elem = ds.get_item(_TAG[keyword])
    if elem is None:
        return []
    value = elem.value
    if isinstance(value, bytes):
        text = value.decode("latin-1").strip(" \x00")
        return [v.strip(" \x00") for v in text.split("\\")] if text else []
    if value is None or value == "":
        return []
    return [str(v) for v in _as_list(value)]


def _raw_string(ds: Dataset, keyword: str) -> str:
    values = _raw_strings(ds, keyword)
    return values[0] if values else ""


def _raw_uint16(ds: Dataset, keyword: str) -> int | None:
    """A US attribute (Rows, BitsAllocated, ...) from its raw bytes, or None if missing."""
    elem = ds.get_item(_TAG[keyword])
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        if len(value) < 2:
            return None
        order = "little" if getattr(elem, "is_little_endian", True) else "big"
        return int.from_bytes(value[:2], order)
    return _int_or_none(value)


def _raw_number(ds: Dataset, keyword: str) -> float | None:
    return _float_or_none(_raw_string(ds, keyword) or None)


def _raw_numbers(ds: Dataset, keyword: str, count: int) -> np.ndarray | None:
    """A multi-valued DS attribute as float64 (count,), or None if missing/invalid."""
    try:
        values = np.array([float(v) for v in _raw_strings(ds, keyword)], dtype=np.float64)
    except ValueError:
        return None
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        return None
    return values


def _header_fields(
    path: Path, ds: Dataset, pixel_offset: int | None, pixel_length: int | None
) -> _Header:
    """Extract the header values used by the reader, once per file."""
    meta = getattr(ds, "file_meta", None) or Dataset()
    slope = _raw_number(ds, "RescaleSlope")
    intercept = _raw_number(ds, "RescaleIntercept")
    instance = _raw_number(ds, "InstanceNumber")
    bits_allocated = _raw_uint16(ds, "BitsAllocated") or 0
    bits_stored = _raw_uint16(ds, "BitsStored")
    frames = _raw_number(ds, "NumberOfFrames")
    return _Header(
        path=path,
        ds=ds,
        sop_class=_raw_string(ds, "SOPClassUID")
        or str(meta.get("MediaStorageSOPClassUID", "") or ""),
        sop_uid=_raw_string(ds, "SOPInstanceUID"),
        series_uid=_raw_string(ds, "SeriesInstanceUID"),
        modality=_raw_string(ds, "Modality").upper(),
        image_type=tuple(v.upper() for v in _raw_strings(ds, "ImageType")),
        instance_number=None if instance is None else int(instance),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "") or ""),
        pixel_offset=pixel_offset,
        pixel_length=pixel_length,
        ipp=_raw_numbers(ds, "ImagePositionPatient", 3),
        iop=_raw_numbers(ds, "ImageOrientationPatient", 6),
        pixel_spacing=_raw_numbers(ds, "PixelSpacing", 2),
        rows=_raw_uint16(ds, "Rows"),
        cols=_raw_uint16(ds, "Columns"),
        slope=1.0 if slope is None else slope,
        intercept=0.0 if intercept is None else intercept,
        pixel_format=(
            bits_allocated,
            bits_allocated if bits_stored is None else bits_stored,
            _raw_uint16(ds, "PixelRepresentation") or 0,
            _raw_uint16(ds, "SamplesPerPixel") or 1,
            1 if frames is None else int(frames),
        ),
    )


def _locate_pixel_data(fp, ds: Dataset) -> tuple[int | None, int | None]:
    """Find the Pixel Data value right after where ``stop_before_pixels`` stopped.

    Returns (file offset of the value, or None when it cannot be read directly: compressed,
    big endian, deflated; value length in bytes, or None when there is no Pixel Data element).
    """
    transfer_syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    if transfer_syntax == DeflatedExplicitVRLittleEndian:  # file position is not meaningful
        return None, _UNDEFINED_LENGTH
    is_implicit, is_little = ds.original_encoding
    start = fp.tell()
    tag = fp.read(4)
    if tag != _PIXEL_DATA_TAG:
        return None, None
    if not is_little:
        return None, _UNDEFINED_LENGTH
    if is_implicit:
        raw_len = fp.read(4)
        value_offset = start + 8
    else:
        vr = fp.read(2)
        if vr in (b"OB", b"OW", b"UN"):
            fp.read(2)
            raw_len = fp.read(4)
            value_offset = start + 12
        else:
            raw_len = fp.read(2)
            value_offset = start + 8
    if len(raw_len) not in (2, 4):
        return None, None
    length = int.from_bytes(raw_len, "little")
    direct = length != _UNDEFINED_LENGTH and transfer_syntax in _FAST_TRANSFER_SYNTAXES
    return (value_offset if direct else None), length


def _check_complete(header: _Header, file_size: int) -> None:
    """Raise for a DICM-marked CT image file without complete Pixel Data (truncated)."""
    if not header.sop_class:
        raise StudyReadError(
            header.path, "not a DICOM file (truncated or corrupt: no SOP Class UID)"
        )
    claims_ct = header.sop_class in (CT_IMAGE_STORAGE, *_MULTIFRAME_CT) or header.modality == "CT"
    claims_image = claims_ct or header.rows is not None
    if not claims_image:
        return
    if header.pixel_length is None:
        raise StudyReadError(header.path, "not a DICOM file (truncated or corrupt: no Pixel Data)")
    if header.pixel_offset is not None and header.pixel_offset + header.pixel_length > file_size:
        raise StudyReadError(
            header.path,
            f"not a DICOM file (truncated or corrupt: Pixel Data needs {header.pixel_length} "
            f"bytes, {max(file_size - header.pixel_offset, 0)} present)",
        )
    single_frame = header.sop_class not in _MULTIFRAME_CT
    if claims_ct and single_frame and "LOCALIZER" not in header.image_type:
        for keyword, value in (("Rows", header.rows), ("Columns", header.cols)):
            if value is None:
                raise StudyReadError(
                    header.path, f"not a DICOM file (truncated or corrupt: no {keyword})"
                )


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _hash_uid(uid: str) -> str:
    """First 16 hex characters of the SHA-256 of a UID (non-identifying handle)."""
    return hashlib.sha256(str(uid).encode("ascii", "replace")).hexdigest()[:16]


# ---- DICOM folder -> series -----------------------------------------------------------------


def _list_files(folder: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files.extend(Path(root) / n for n in sorted(names))
    return [p for p in files if p.is_file()]


def _load_dicom_folder(folder: Path) -> Study:
    files = _list_files(folder)
    if not files:
        raise StudyReadError(folder, "empty folder (no files)")
    headers = []
    for path in files:
        header = _read_header(path)
        if header is None:
            logger.debug("%s: skipped, not a DICOM file", path)
        else:
            headers.append(header)
    if not headers:
        raise StudyReadError(folder, f"no DICOM files found ({len(files)} files checked)")
    return _study_from_headers(headers, folder, n_files=len(files))


@dataclass(eq=False)
class _SeriesGroup:
    """Instances of one SeriesInstanceUID with one orientation."""

    series_uid: str
    iop: np.ndarray  # (6,) row cosine, column cosine
    members: list[_Header] = field(default_factory=list)

    @property
    def normal(self) -> np.ndarray:
        return _slice_normal(self.iop)

    @property
    def orientation(self) -> str:
        return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(self.normal)))]

    @property
    def n_instances(self) -> int:
        return len({h.sop_uid or str(h.path) for h in self.members})

    def summary(self) -> dict:
        ds = self.members[0].ds
        return {
            "series_uid_hash": _hash_uid(self.series_uid),
            "series_number": _int_or_none(ds.get("SeriesNumber")),
            "series_description": str(ds.get("SeriesDescription", "") or ""),
            "orientation": self.orientation,
            "n_images": self.n_instances,
        }


def _slice_normal(iop: np.ndarray) -> np.ndarray:
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def _study_from_headers(headers: list[_Header], where: Path, n_files: int) -> Study:
    issues: list[str] = []
    ct, unplaceable = _select_ct_images(headers, where, issues)
    groups = _group_series(ct, where)
    chosen, others = _choose_series(groups, where)
    _check_unplaceable(unplaceable, chosen, issues)
    _check_orientation_consistency(chosen, groups, where)
    members, n_dropped = _deduplicate(chosen.members, chosen.normal)
    if n_dropped:
        issues.append(
            f"dropped {n_dropped} duplicate instance(s) (same SOPInstanceUID or same slice "
            "position)"
        )
    rows, cols, row_spacing, col_spacing = _check_in_plane_consistency(members, where)
    geometry = _slice_geometry(members, chosen.normal, where, issues)

    series_info = chosen.summary()
    series_info["n_images"] = len(members)
    series_message = None
    if others:
        other_text = "; ".join(
            f"#{o['series_number']} '{o['series_description']}' ({o['orientation']}, "
            f"{o['n_images']} images)"
            for o in others
        )
        series_message = (
            f"{len(others) + 1} series found; using #{series_info['series_number']} "
            f"'{series_info['series_description']}' ({len(members)} slices); others: {other_text}"
        )
        issues.append(series_message)

    stored_hu, hu_min, hu_max = _read_pixels(members, rows, cols)
    native = np.array(
        [
            [*(chosen.iop[:3] * col_spacing), 0.0],
            [*(chosen.iop[3:] * row_spacing), 0.0],
            [*geometry["step"], 0.0],
            [*geometry["origin"], 1.0],
        ]
    ).T  # columns: x (along a row), y (down a column), z (slice step), origin; LPS mm
    hu, affine, to_canonical = _reorient_to_canonical(stored_hu, _LPS_TO_RAS @ native)
    issues.extend(_hu_range_warnings(hu_min, hu_max))
    dicom_grid = _DicomGrid(
        sop_instance_uids=tuple(h.sop_uid for h in members),
        files=tuple(str(h.path) for h in members),
        to_canonical=to_canonical,
    )

    metadata = _dicom_metadata(members[0].ds)
    metadata.update(
        {
            "source_kind": "dicom",
            "n_slices": int(hu.shape[0]),
            "series_found": len(others) + 1,
            "series_chosen": series_info,
            "series_others": others,
            "z_spacing_source": geometry["z_source"],
            "gantry_tilt_deg": geometry["tilt_deg"],
            "n_files_checked": n_files,
            "warnings": issues,
        }
    )
    for issue in issues:  # the choice among several series is expected, so only INFO
        level = logging.INFO if issue is series_message else logging.WARNING
        logger.log(level, "%s: %s", where, issue)
    return Study(hu=hu, affine=affine, metadata=metadata, source=str(where), _dicom_grid=dicom_grid)


def _select_ct_images(
    headers: list[_Header], where: Path, issues: list[str]
) -> tuple[list[_Header], list[_Header]]:
    """Classic CT images that are not localizers: (placeable, without geometry).

    Raises when there is no placeable CT image.
    """
    ct = [h for h in headers if h.is_ct_image]
    multiframe = [h for h in headers if h.sop_class in _MULTIFRAME_CT and h.modality in ("CT", "")]
    if not ct:
        if multiframe:
            raise StudyReadError(
                where,
                "Enhanced/multi-frame CT Image Storage is not supported; export the series as "
                "classic CT Image Storage (one file per slice)",
            )
        found = sorted({h.modality or "none" for h in headers})
        raise StudyReadError(
            where, f"no CT images (modalities found: {', '.join(found)}; {len(headers)} files)"
        )
    if multiframe:
        issues.append(f"ignored {len(multiframe)} Enhanced/multi-frame CT instance(s)")
    images = [h for h in ct if not h.is_localizer]
    if not images:
        raise StudyReadError(where, f"only localizer/scout CT images found ({len(ct)} files)")
    usable = [h for h in images if _missing_geometry(h) is None]
    if not usable:
        h = images[0]
        raise StudyReadError(h.path, f"CT image missing or invalid {_missing_geometry(h)}")
    logger.debug(
        "%s: %d CT images, %d localizers dropped", where, len(images), len(ct) - len(images)
    )
    return usable, [h for h in images if _missing_geometry(h) is not None]


def _missing_geometry(h: _Header) -> str | None:
    """Name of the first missing/invalid attribute needed to place the image, else None."""
    for keyword, value in (
        ("ImagePositionPatient", h.ipp),
        ("ImageOrientationPatient", h.iop),
        ("PixelSpacing", h.pixel_spacing),
        ("Rows", h.rows),
        ("Columns", h.cols),
    ):
        if value is None:
            return keyword
    return None


def _check_unplaceable(
    unplaceable: list[_Header], chosen: _SeriesGroup, issues: list[str]
) -> None:
    """CT images without geometry: an error inside the chosen series, else a warning."""
    for h in unplaceable:
        if h.series_uid == chosen.series_uid:
            raise StudyReadError(h.path, f"CT image missing or invalid {_missing_geometry(h)}")
    if unplaceable:
        issues.append(
            f"ignored {len(unplaceable)} CT image(s) of other series without position/orientation "
            f"(e.g. {unplaceable[0].path.name})"
        )


def _group_series(images: list[_Header], where: Path) -> list[_SeriesGroup]:
    groups: list[_SeriesGroup] = []
    for h in images:
        iop = h.iop
        if np.linalg.norm(np.cross(iop[:3], iop[3:])) < 0.5:
            raise StudyReadError(h.path, f"invalid ImageOrientationPatient {list(iop)}")
        for g in groups:
            if g.series_uid == h.series_uid and np.max(np.abs(g.iop - iop)) <= ORIENTATION_TOL:
                g.members.append(h)
                break
        else:
            groups.append(_SeriesGroup(series_uid=h.series_uid, iop=iop, members=[h]))
    return groups


def _choose_series(
    groups: list[_SeriesGroup], where: Path
) -> tuple[_SeriesGroup, list[dict]]:
    """Choose the axial group with most slices; drop non-axial single images (scouts)."""
    candidates = [g for g in groups if not (g.orientation != "axial" and g.n_instances == 1)]
    scouts = len(groups) - len(candidates)
    if scouts:
        logger.debug("%s: dropped %d non-axial single image(s) (scouts)", where, scouts)
    axial = [g for g in candidates if g.orientation == "axial"]
    if not axial:
        found = ", ".join(f"{g.orientation} ({g.n_instances} images)" for g in groups)
        raise StudyReadError(
            where, f"no axial CT series: only {found} found; the method needs axial slices"
        )

    def rank(g: _SeriesGroup):
        ds = g.members[0].ds
        is_original = "ORIGINAL" in tuple(str(v).upper() for v in _as_list(ds.get("ImageType")))
        number = _int_or_none(ds.get("SeriesNumber"))
        return (-g.n_instances, not is_original, number if number is not None else 1 << 30,
                g.series_uid)

    axial.sort(key=rank)
    chosen = axial[0]
    others = [g.summary() for g in candidates if g is not chosen]
    return chosen, others


def _check_orientation_consistency(
    chosen: _SeriesGroup, groups: list[_SeriesGroup], where: Path
) -> None:
    for g in groups:
        if g is chosen or g.series_uid != chosen.series_uid or g.orientation != "axial":
            continue
        raise StudyReadError(
            where,
            f"inconsistent ImageOrientationPatient inside the series: "
            f"{chosen.members[0].path.name} has {_fmt(chosen.iop)} but "
            f"{g.members[0].path.name} has {_fmt(g.iop)}",
        )


def _fmt(values) -> str:
    return "[" + ", ".join(f"{float(v):.4g}" for v in values) + "]"


def _deduplicate(members: list[_Header], normal: np.ndarray) -> tuple[list[_Header], int]:
    """Drop repeated SOPInstanceUIDs and repeated slice positions; return (sorted kept, n_dropped).

    The returned list is sorted by position along the slice normal (ascending). Among
    duplicates, the instance with the lowest InstanceNumber (then path) is kept.
    """
    ordered = sorted(
        members,
        key=lambda h: (h.instance_number is None, h.instance_number or 0, str(h.path)),
    )
    seen: set[str] = set()
    unique = []
    for h in ordered:
        key = h.sop_uid or str(h.path)
        if key not in seen:
            seen.add(key)
            unique.append(h)
    positions = np.array([h.ipp @ normal for h in unique])
    order = np.argsort(positions, kind="stable")
    kept: list[int] = []
    for idx in order:
        if kept and abs(positions[idx] - positions[kept[-1]]) < DUPLICATE_POSITION_TOL_MM:
            continue
        kept.append(int(idx))
    return [unique[i] for i in kept], len(members) - len(kept)


def _check_in_plane_consistency(
    members: list[_Header], where: Path
) -> tuple[int, int, float, float]:
    """Rows, columns and pixel spacing (row, column) in mm, identical across the series."""
    first = members[0]
    rows, cols = first.rows, first.cols
    spacing = first.pixel_spacing
    if np.any(spacing <= 0):
        raise StudyReadError(first.path, f"invalid PixelSpacing {_fmt(spacing)}")
    for h in members[1:]:
        if (h.rows, h.cols) != (rows, cols):
            raise StudyReadError(
                where,
                f"inconsistent Rows/Columns inside the series: {first.path.name} is "
                f"{rows}x{cols} but {h.path.name} is {h.rows}x{h.cols}",
            )
        other = h.pixel_spacing
        if np.max(np.abs(other - spacing)) > SPACING_TOL_MM:
            raise StudyReadError(
                where,
                f"inconsistent PixelSpacing inside the series: {first.path.name} has "
                f"{_fmt(spacing)} but {h.path.name} has {_fmt(other)}",
            )
    return rows, cols, float(spacing[0]), float(spacing[1])


def _slice_geometry(
    members: list[_Header], normal: np.ndarray, where: Path, issues: list[str]
) -> dict:
    """Origin (LPS mm), slice step vector (LPS mm), z source and tilt of sorted slices."""
    positions = np.array([h.ipp for h in members])
    origin = positions[0]
    if len(members) == 1:
        ds = members[0].ds
        between = _float_or_none(ds.get("SpacingBetweenSlices"))
        thickness = _float_or_none(ds.get("SliceThickness"))
        if between and between > 0:
            dz, source = between, "SpacingBetweenSlices (single slice)"
        elif thickness and thickness > 0:
            dz, source = thickness, "SliceThickness (single slice)"
        else:
            dz, source = 1.0, "default 1 mm (single slice)"
        return {"origin": origin, "step": normal * dz, "z_source": source, "tilt_deg": 0.0}

    deltas = np.diff(positions, axis=0)
    steps = deltas @ normal
    median = float(np.median(steps))
    big = np.flatnonzero(steps > GAP_FACTOR * median)
    if big.size:
        i = int(big[0])
        raise StudyReadError(
            where,
            f"missing slices: gap of {steps[i]:.4g} mm between slice positions "
            f"{positions[i] @ normal:.4g} and {positions[i + 1] @ normal:.4g} mm along the slice "
            f"normal (files {members[i].path.name}, {members[i + 1].path.name}; median step "
            f"{median:.4g} mm)",
        )
    if np.max(np.abs(steps - median)) > max(UNEVEN_REL_TOL * median, UNEVEN_ABS_TOL_MM):
        issues.append(
            f"uneven slice spacing: steps from {steps.min():.4g} to {steps.max():.4g} mm; "
            f"median {median:.4g} mm used"
        )
    tangential = deltas - steps[:, None] * normal[None, :]
    shear = np.median(tangential / steps[:, None], axis=0)
    tilt_deg = float(np.degrees(np.arctan(np.linalg.norm(shear))))
    if tilt_deg > TILT_MAX_DEG:
        raise StudyReadError(
            where, f"slice positions imply a gantry tilt of {tilt_deg:.1f} degrees "
            f"(> {TILT_MAX_DEG:g}); implausible slice geometry"
        )
    if tilt_deg > TILT_IGNORE_DEG:
        issues.append(
            f"gantry tilt of {tilt_deg:.2f} degrees: slices kept as acquired, affine is sheared"
        )
    else:
        shear, tilt_deg = np.zeros(3), 0.0
    return {
        "origin": origin,
        "step": median * (normal + shear),
        "z_source": "median distance between ImagePositionPatient",
        "tilt_deg": round(tilt_deg, 4),
    }


# ---- DICOM pixel data -----------------------------------------------------------------------


def _read_pixels(
    members: list[_Header], rows: int, cols: int
) -> tuple[np.ndarray, float, float]:
    """Read and rescale the pixel data of sorted instances.

    Returns (float32 (n, rows, cols) HU, min HU, max HU); min/max are taken per slice while the
    stored values are still in cache.
    """
    out = np.empty((len(members), rows, cols), dtype=np.float32)
    buffers: dict[str, np.ndarray] = {}
    lo, hi = np.inf, -np.inf
    for k, h in enumerate(members):
        stored = _read_native_pixels(h, rows, cols, buffers)
        if stored is None:
            stored = _read_pixels_with_pydicom(h, rows, cols)
        if h.slope == 1.0:  # int16 + float32 scalar -> float32 in one pass, exact for HU
            np.add(stored, np.float32(h.intercept), out=out[k])
        else:
            out[k] = stored.astype(np.float64) * h.slope + h.intercept
        ends = (float(stored.min()) * h.slope + h.intercept, float(stored.max()) * h.slope
                + h.intercept)
        lo, hi = min(lo, *ends), max(hi, *ends)
    return out, lo, hi


def _read_native_pixels(
    h: _Header, rows: int, cols: int, buffers: dict[str, np.ndarray]
) -> np.ndarray | None:
    """Read uncompressed little-endian 16-bit pixels straight from the file, else None."""
    bits_allocated, bits_stored, representation, samples, frames = h.pixel_format
    if (
        h.pixel_offset is None
        or (bits_allocated, samples, frames) != (16, 1, 1)
        or h.pixel_length != rows * cols * 2
    ):
        return None
    dtype = "<i2" if representation == 1 else "<u2"
    buf = buffers.get(dtype)
    if buf is None or buf.size != rows * cols:
        buf = buffers[dtype] = np.empty(rows * cols, dtype=dtype)
    try:
        with open(h.path, "rb", buffering=0) as fp:
            fp.seek(h.pixel_offset)
            n_read = fp.readinto(memoryview(buf).cast("B"))
    except OSError as err:
        raise StudyReadError(h.path, f"cannot read pixel data ({err.strerror or err})") from err
    if n_read != buf.nbytes:
        raise StudyReadError(
            h.path,
            f"not a DICOM file (truncated or corrupt: Pixel Data has {n_read} of "
            f"{buf.nbytes} bytes)",
        )
    if 0 < bits_stored < 16:  # ignore unused high bits (sign-extend if signed), as pydicom does
        shift = 16 - bits_stored
        np.left_shift(buf, shift, out=buf)
        np.right_shift(buf, shift, out=buf)
    return buf.reshape(rows, cols)


def _read_pixels_with_pydicom(h: _Header, rows: int, cols: int) -> np.ndarray:
    """Fallback for compressed or unusual pixel data; clear errors when it cannot be decoded."""
    syntax = UID(h.transfer_syntax) if h.transfer_syntax else None
    try:
        ds = pydicom.dcmread(h.path)
        arr = ds.pixel_array
    except Exception as err:
        if syntax is not None and syntax.is_compressed:
            hint = (
                "pip install pylibjpeg pylibjpeg-openjpeg"
                if syntax in JPEG2000TransferSyntaxes
                else "pip install pylibjpeg pylibjpeg-libjpeg"
            )
            raise StudyReadError(
                h.path,
                f"cannot decode pixel data in transfer syntax '{syntax.name}' ({syntax}) with "
                f"the installed handlers ({type(err).__name__}: {err}); if the file is intact, "
                f"install a decoder: `{hint}` or `pip install python-gdcm`",
            ) from err
        raise StudyReadError(
            h.path, f"not a DICOM file (truncated or corrupt pixel data: {err})"
        ) from err
    if arr.shape != (rows, cols):
        raise StudyReadError(
            h.path, f"pixel data of shape {arr.shape}, expected one {rows}x{cols} grayscale frame"
        )
    return arr


# ---- metadata and checks --------------------------------------------------------------------


def _dicom_metadata(ds: Dataset) -> dict:
    """Non-identifying acquisition fields of a representative instance."""

    def text(keyword: str) -> str:
        value = ds.get(keyword)
        if value is None:
            return ""
        return "\\".join(str(v) for v in _as_list(value)) if not isinstance(value, str) else value

    return {
        "modality": text("Modality"),
        "manufacturer": text("Manufacturer"),
        "model": text("ManufacturerModelName"),
        "kvp": _float_or_none(ds.get("KVP")),
        "convolution_kernel": text("ConvolutionKernel"),
        "slice_thickness_mm": _float_or_none(ds.get("SliceThickness")),
        "series_description": text("SeriesDescription"),
        "study_uid_hash": _hash_uid(text("StudyInstanceUID")),
        "series_uid_hash": _hash_uid(text("SeriesInstanceUID")),
    }


def _hu_range_warnings(lo: float, hi: float) -> list[str]:
    """Warnings for an HU range (min, max) that does not look like calibrated CT."""
    issues = []
    if lo > HU_MIN_IMPLAUSIBLE:
        issues.append(
            f"HU range {lo:.0f}..{hi:.0f} has no air (min > {HU_MIN_IMPLAUSIBLE:.0f}): "
            "missing RescaleIntercept or not CT data?"
        )
    if hi > HU_MAX_IMPLAUSIBLE:
        issues.append(f"HU range {lo:.0f}..{hi:.0f} exceeds {HU_MAX_IMPLAUSIBLE:.0f} HU")
    return issues


# ---- orientation ----------------------------------------------------------------------------


def _reorient_to_canonical(
    vol_zyx: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip/permute a (z, y, x) array with voxel->RAS ``affine`` into canonical LPS.

    Returns (canonical (z, y, x) array, its affine, nibabel ornt transform original->canonical
    acting on (x, y, z) axes).
    """
    transform = nio.ornt_transform(nio.io_orientation(affine), _CANONICAL_ORNT)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return vol_zyx, affine, transform
    vol_xyz = vol_zyx.transpose(2, 1, 0)
    canonical = nio.apply_orientation(vol_xyz, transform)
    new_affine = affine @ nio.inv_ornt_aff(transform, vol_xyz.shape)
    return np.ascontiguousarray(canonical.transpose(2, 1, 0)), new_affine, transform


# ---- NIfTI ----------------------------------------------------------------------------------


def _read_nifti(path: Path, dtype: Any = np.float32):
    """(image, (x, y, z) array of ``dtype`` or the scaled native type if None, full shape)."""
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise StudyReadError(path, f"unreadable NIfTI (loaded as {type(img).__name__})")
        shape = tuple(int(s) for s in img.shape)
        if len(shape) < 3 or any(s != 1 for s in shape[3:]):
            raise StudyReadError(
                path, f"not a 3D volume (shape {shape}); expected (x, y, z) or (x, y, z, 1)"
            )
        data = np.asarray(img.dataobj, dtype=dtype).reshape(shape[:3])
    except StudyReadError:
        raise
    except Exception as err:  # nibabel/gzip/zlib raise many types on damaged files
        raise StudyReadError(path, f"unreadable NIfTI ({type(err).__name__}: {err})") from err
    return img, data, shape


def _load_nifti(path: Path) -> Study:
    img, data, shape = _read_nifti(path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise StudyReadError(path, f"invalid NIfTI affine (singular or not finite): {affine[:3]}")
    hu, canonical_affine_, transform = _reorient_to_canonical(data.transpose(2, 1, 0), affine)
    hu, issues, lo, hi = _replace_non_finite(hu, path)
    issues += _hu_range_warnings(lo, hi)
    for warning in issues:
        logger.warning("%s: %s", path, warning)
    metadata = {
        "source_kind": "nifti",
        "n_slices": int(hu.shape[0]),
        "nifti_axcodes": "".join(str(c) for c in nio.aff2axcodes(affine)),
        "warnings": issues,
    }
    grid = _NiftiGrid(
        shape=shape,
        affine=affine.copy(),
        header=img.header.copy(),
        image_class=type(img),
        to_canonical=transform,
    )
    return Study(
        hu=np.ascontiguousarray(hu, dtype=np.float32),
        affine=canonical_affine_,
        metadata=metadata,
        source=str(path),
        _nifti_grid=grid,
    )


def _replace_non_finite(hu: np.ndarray, path: Path) -> tuple[np.ndarray, list[str], float, float]:
    """NaN/infinite voxels (float NIfTI, often outside the reconstructed field of view) -> air.

    Returns (hu, warnings, min HU, max HU); ``hu`` is returned as is (no copy) when all is finite.
    """
    lo, hi = float(hu.min()), float(hu.max())  # NaN or +-inf when any voxel is not finite
    if np.isfinite(lo) and np.isfinite(hi):
        return hu, [], lo, hi
    finite = np.isfinite(hu)
    n_bad = int(hu.size - np.count_nonzero(finite))
    if n_bad == hu.size:
        raise StudyReadError(path, "every voxel is NaN or infinite")
    hu = np.where(finite, hu, np.float32(NON_FINITE_HU))
    warning = f"{n_bad} NaN or infinite voxel(s) set to {NON_FINITE_HU:g} HU (air)"
    return hu, [warning], float(hu.min()), float(hu.max())


def load_mask(path: str | os.PathLike, study: Study) -> np.ndarray:
    """Read a NIfTI mask of ``study`` into the study's canonical (z, y, x) grid.

    The mask may be stored in any axis order/orientation (e.g. the input NIfTI's own grid, as
    :func:`save_mask` writes it); after reorientation its grid must equal the study's
    (same shape, affine within 1e-4 mm per voxel step and 0.01 mm in origin).

    Returns:
        (z, y, x) uint8 labels when the values are whole numbers in 0..255, else float32.

    Raises:
        StudyReadError: unreadable file, not 3-D, or a grid that does not match the study.
    """
    path = Path(path)
    if not path.exists():
        raise StudyReadError(path, "does not exist")
    img, data, _ = _read_nifti(path, dtype=None)
    affine = np.asarray(img.affine, dtype=np.float64)
    mask, mask_affine, _ = _reorient_to_canonical(data.transpose(2, 1, 0), affine)
    if mask.shape != study.hu.shape:
        raise StudyReadError(
            path, f"mask grid {mask.shape} (z, y, x) does not match the study's {study.hu.shape}"
        )
    step_ok = np.allclose(mask_affine[:3, :3], study.affine[:3, :3], atol=1e-4)
    if not step_ok or not np.allclose(mask_affine[:3, 3], study.affine[:3, 3], atol=0.01):
        raise StudyReadError(
            path,
            f"mask affine {np.round(mask_affine[:3], 4).tolist()} does not match the study's "
            f"{np.round(study.affine[:3], 4).tolist()}",
        )
    mask = np.ascontiguousarray(mask)
    if np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            return mask.astype(np.float32)
        return mask.astype(np.uint8, copy=False)
    whole = np.all(np.isfinite(mask)) and np.array_equal(mask, np.round(mask))
    if whole and (not mask.size or (mask.min() >= 0 and mask.max() <= 255)):
        return mask.astype(np.uint8)
    return mask.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Writing NIfTI in the input's grid
# --------------------------------------------------------------------------------------------


def save_mask(study: Study, mask: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a canonical (z, y, x) mask as NIfTI in the input's own voxel grid and header.

    Integer/bool masks are written as uint8 labels (values must be 0..255); float maps as
    float32. NIfTI inputs: same shape, affine, sform and qform as the input file. DICOM
    inputs: the series geometry (``study.affine``). Written atomically.

    Raises:
        ValueError: if ``mask.shape != study.hu.shape`` or labels do not fit uint8.
    """
    mask = np.asarray(mask)
    if mask.shape != study.hu.shape:
        raise ValueError(
            f"mask shape {mask.shape} does not match study.hu shape {study.hu.shape}"
        )
    if mask.dtype == bool or np.issubdtype(mask.dtype, np.integer):
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(
                f"integer mask values must be 0..255 labels, got {mask.min()}..{mask.max()}"
            )
        dtype = np.uint8
    elif np.issubdtype(mask.dtype, np.floating):
        dtype = np.float32
    else:
        raise ValueError(f"mask dtype {mask.dtype} is neither integer, bool nor float")
    return save_volume(study, mask, path, dtype=dtype)


def save_unit_map(study: Study, values: np.ndarray, path: str | os.PathLike, chunk: int = 64) -> Path:
    """Write a ``[0, 1]`` map (e.g. the fine localization map) as NIfTI uint8 with scale 1/255.

    Readers that apply the NIfTI scale (nibabel, 3D Slicer, ITK-SNAP) show values in [0, 1] with a
    resolution of 1/255; the file is a quarter of float32's size, and the conversion runs in slabs
    of ``chunk`` slices, so it needs no float copy of the volume. Same grid as :func:`save_mask`.
    """
    values = np.asarray(values)
    if values.shape != study.hu.shape:
        raise ValueError(f"map shape {values.shape} does not match study.hu shape {study.hu.shape}")
    stored = np.empty(values.shape, np.uint8)
    for start in range(0, values.shape[0], chunk):
        part = values[start:start + chunk].astype(np.float32)
        stored[start:start + chunk] = np.rint(np.clip(part, 0.0, 1.0) * 255.0)
    path = Path(path)
    if not _is_nifti_name(path):
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    img = _image_in_input_grid(study, stored)
    img.header.set_slope_inter(1.0 / 255.0, 0.0)
    _atomic_nifti_save(img, path)
    return path


def save_volume(
    study: Study, volume: np.ndarray, path: str | os.PathLike, dtype: Any = None
) -> Path:
    """Write a canonical (z, y, x) volume as NIfTI in the input's grid (see :func:`save_mask`).

    Args:
        volume: (z, y, x) array with ``study.hu.shape``.
        path: output ``.nii`` or ``.nii.gz`` path.
        dtype: stored type (default: the volume's; bool -> uint8). Float data written to an
            integer type is rounded and clipped to its range (e.g. HU as int16).
    """
    volume = np.asarray(volume)
    if volume.shape != study.hu.shape:
        raise ValueError(
            f"volume shape {volume.shape} does not match study.hu shape {study.hu.shape}"
        )
    path = Path(path)
    if not _is_nifti_name(path):
        raise ValueError(f"{path}: output must end in .nii or .nii.gz")
    data = _cast(volume, np.dtype(dtype) if dtype is not None else None)
    img = _image_in_input_grid(study, data)
    _atomic_nifti_save(img, path)
    return path


def _cast(volume: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
    if dtype is None:
        dtype = np.dtype(np.uint8) if volume.dtype == bool else volume.dtype
    if np.issubdtype(dtype, np.integer) and np.issubdtype(volume.dtype, np.floating):
        info = np.iinfo(dtype)
        return np.clip(np.rint(volume), info.min, info.max).astype(dtype)
    return volume.astype(dtype, copy=False)


def _image_in_input_grid(study: Study, data_zyx: np.ndarray):
    grid = study._nifti_grid
    data_xyz = data_zyx.transpose(2, 1, 0)
    if grid is None:
        # (z, y, x) C-order transposed is (x, y, z) Fortran order, which is how NIfTI stores voxels:
        # nibabel writes it without a copy.
        img = nib.Nifti1Image(data_xyz, study.affine)
        img.header.set_xyzt_units("mm")
        img.set_sform(study.affine, code=1)
        img.set_qform(study.affine, code=1)
    else:
        original = nio.apply_orientation(data_xyz, _invert_ornt(grid.to_canonical)).reshape(grid.shape)
        header = grid.header.copy()
        header.set_data_dtype(data_zyx.dtype)
        sform, sform_code = header.get_sform(), int(header["sform_code"])
        qform, qform_code = header.get_qform(), int(header["qform_code"])
        img = grid.image_class(original, grid.affine, header=header)
        img.set_sform(sform, code=sform_code)
        img.set_qform(qform, code=qform_code)
        header = img.header
        header.extensions.clear()  # may embed source headers (e.g. DICOM fields)
        header["cal_min"], header["cal_max"] = 0, 0
    header = img.header
    header.set_slope_inter(1.0, 0.0)
    header["descrip"] = b"radlogics_repro"
    header["aux_file"] = b""
    header["intent_code"] = 0
    return img


def _invert_ornt(transform: np.ndarray) -> np.ndarray:
    """Inverse of a nibabel ornt transform (input axis i -> output axis t[i, 0], flip t[i, 1])."""
    inverse = np.empty_like(transform)
    for axis, (target, flip) in enumerate(np.asarray(transform)):
        inverse[int(target)] = (axis, flip)
    return inverse


def _atomic_nifti_save(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")  # keeps .nii(.gz) suffix
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------------------------
# Writing a synthetic DICOM series
# --------------------------------------------------------------------------------------------


def write_dicom_series(
    hu: np.ndarray,
    spacing: Sequence[float],
    out_dir: str | os.PathLike,
    *,
    origin_lps: Sequence[float] = (0.0, 0.0, 0.0),
    patient_name: str = "",
    patient_id: str = "",
    birth_date: str = "",
    series_description: str = "",
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    extra: dict | None = None,
    file_prefix: str = "IM",
) -> list[Path]:
    """Write a canonical (z, y, x) HU volume as a CT Image Storage series, one file per slice.

    Stored pixels are int16 with RescaleSlope 1 / RescaleIntercept -1024 (HU are rounded and
    clipped to -33792..31743). Slice k is at ``origin_lps + (0, 0, k * spacing[0])`` (LPS mm)
    with ImageOrientationPatient [1, 0, 0, 0, 1, 0]; PixelSpacing is [spacing[1], spacing[2]].
    UIDs are derived from ``seed`` (deterministic). ``extra`` overrides attributes of every
    slice (e.g. ``{"Modality": "MR"}``). Files ``<file_prefix>0001.dcm``... are written into a
    temporary sibling folder, then moved into ``out_dir`` (created if needed).

    Returns:
        The written file paths, in slice order (inferior to superior).
    """
    hu = np.asarray(hu, dtype=np.float64)
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D (z, y, x), got shape {hu.shape}")
    sz, sy, sx = (float(s) for s in spacing)
    stored = np.clip(np.rint(hu - STORED_INTERCEPT), -32768, 32767).astype("<i2")
    study_uid = study_uid or generate_uid(entropy_srcs=["radlogics_repro", str(seed), "study"])
    series_uid = series_uid or generate_uid(
        entropy_srcs=["radlogics_repro", str(seed), "series", str(study_uid)]
    )
    frame_uid = generate_uid(entropy_srcs=["radlogics_repro", str(seed), "frame", str(study_uid)])
    common = {
        "patient_name": patient_name,
        "patient_id": patient_id,
        "birth_date": birth_date,
        "series_description": series_description,
        "study_uid": study_uid,
        "series_uid": series_uid,
        "frame_uid": frame_uid,
        "spacing": (sz, sy, sx),
    }

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        names = []
        for k in range(stored.shape[0]):
            position = (float(origin_lps[0]), float(origin_lps[1]), float(origin_lps[2]) + k * sz)
            ds = _ct_slice_dataset(stored[k], k, position, common, extra or {})
            name = f"{file_prefix}{k + 1:04d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            names.append(name)
        _move_files_into(tmp, out_dir, names)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return [out_dir / n for n in names]


def _move_files_into(tmp: Path, out_dir: Path, names: list[str]) -> None:
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    clashes = [n for n in names if (out_dir / n).exists()]
    if clashes:
        raise FileExistsError(f"{out_dir}: would overwrite {clashes[0]} (use file_prefix)")
    for n in names:
        os.replace(tmp / n, out_dir / n)


def _ds_number(value: float) -> str:
    return format_number_as_ds(float(value))


def _ct_slice_dataset(
    pixels: np.ndarray, k: int, position: tuple[float, float, float], common: dict, extra: dict
) -> Dataset:
    """One CT Image Storage dataset (explicit VR little endian) for slice index ``k``."""
    sz, sy, sx = common["spacing"]
    sop_uid = generate_uid(entropy_srcs=["radlogics_repro", str(common["series_uid"]), str(k)])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RADLOGICS_REPRO"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = UID(CT_IMAGE_STORAGE)
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20200101"  # fixed, synthetic
    ds.StudyTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "radlogics_repro"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = common["series_description"]
    ds.ManufacturerModelName = "synthetic"
    ds.PatientName = common["patient_name"]
    ds.PatientID = common["patient_id"]
    ds.PatientBirthDate = common["birth_date"]
    ds.PatientSex = ""
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds_number(sz)
    ds.KVP = "120"
    ds.SpacingBetweenSlices = _ds_number(sz)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = common["study_uid"]
    ds.SeriesInstanceUID = common["series_uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds_number(v) for v in position]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = common["frame_uid"]
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds_number(position[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelSpacing = [_ds_number(sy), _ds_number(sx)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = _ds_number(STORED_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    ds["PixelData"].VR = "OW"
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds
