"""Voxel grid and breathing warp of a synthetic scan.

Coordinates: the *patient frame* is LPS-aligned millimetres, ``X`` toward the patient's left, ``Y``
toward posterior, ``Z`` toward superior, with (X, Y) = (0, 0) at the centre of the body outline and
Z = 0 at the top of the right diaphragm dome at full inspiration. Arrays are indexed (z, y, x) like
everything else in the package, so index z = 0 is the most inferior slice.

Breathing: the anatomy is described at full inspiration (the *reference* frame). An expiration scan
shrinks everything in-plane by ``sxy`` about the body centre, and the lungs and the organs around
them cranio-caudally by ``sz`` toward the lung apex (the diaphragm rises); the bones and the body
outline keep their heights. Both maps are linear per axis, so they cost nothing per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """A canonical voxel grid.

    Attributes:
        shape: (nz, ny, nx) voxels.
        spacing: (dz, dy, dx) in mm.
        origin: patient-frame (Z, Y, X) in mm of the centre of voxel (0, 0, 0).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def zs(self) -> np.ndarray:
        """Z (mm) of every slice, shape (nz,), float32."""
        return (self.origin[0] + np.arange(self.shape[0]) * self.spacing[0]).astype(np.float32)

    def ys(self) -> np.ndarray:
        """Y (mm) of every row, shape (ny,), float32."""
        return (self.origin[1] + np.arange(self.shape[1]) * self.spacing[1]).astype(np.float32)

    def xs(self) -> np.ndarray:
        """X (mm) of every column, shape (nx,), float32."""
        return (self.origin[2] + np.arange(self.shape[2]) * self.spacing[2]).astype(np.float32)

    @property
    def voxel_volume_mm3(self) -> float:
        """Volume of one voxel, mm^3."""
        return float(np.prod(self.spacing))

    @property
    def pixel_area_mm2(self) -> float:
        """In-plane pixel area, mm^2."""
        return float(self.spacing[1] * self.spacing[2])


@dataclass(frozen=True)
class Breath:
    """Linear breathing warp between the reference (inspiration) frame and a scan.

    Attributes:
        phase: 'inhale' or 'exhale'.
        sxy: in-plane scale of the whole body (1 at inspiration).
        sz: cranio-caudal scale of the lungs and neighbouring organs toward ``apex_z``.
        apex_z: Z (mm) of the lung apex, the fixed point of the cranio-caudal scale.
    """

    phase: str
    sxy: float
    sz: float
    apex_z: float

    @staticmethod
    def inhale(apex_z: float) -> Breath:
        """The identity warp (full inspiration)."""
        return Breath("inhale", 1.0, 1.0, float(apex_z))

    def ref_xy(self, v: np.ndarray) -> np.ndarray:
        """Scan in-plane coordinate (X or Y, mm) -> reference frame."""
        return v / np.float32(self.sxy)

    def ref_z(self, z: np.ndarray) -> np.ndarray:
        """Scan Z (mm) -> reference Z for the lungs and the organs that move with them."""
        return np.float32(self.apex_z) - (np.float32(self.apex_z) - z) / np.float32(self.sz)

    def scan_points(self, p: np.ndarray, *, move_z: bool = True) -> np.ndarray:
        """Reference points (..., 3) as (X, Y, Z) mm -> scan frame."""
        out = np.array(p, dtype=np.float64, copy=True)
        out[..., :2] *= self.sxy
        if move_z:
            out[..., 2] = self.apex_z - (self.apex_z - out[..., 2]) * self.sz
        return out


def smoothstep(t: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, 3t^2 - 2t^3 in between (same shape and dtype as ``t``)."""
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def ramp(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear 0 -> 1 as ``v`` goes from ``lo`` to ``hi`` (clipped); ``lo`` may exceed ``hi``."""
    if hi == lo:
        return (v >= hi).astype(np.float32)
    return np.clip((v - lo) / (hi - lo), 0, 1)
