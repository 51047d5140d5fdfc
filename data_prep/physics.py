"""Four-vector helpers on numpy arrays: (px, py, pz, E) to (pT, eta, phi, m) and back.

Conventions, chosen so that no token ever carries a NaN, an infinity or a huge sentinel:

- m^2 = E^2 - |p|^2 loses precision by cancellation. A value down to ``-(MASS2_ABS_TOLERANCE +
  MASS2_REL_TOLERANCE * E^2)`` is rounding and gives m = 0. A more negative m^2 is a spacelike
  vector: it is flagged in ``Kinematics.spacelike`` and its mass is returned as -sqrt(-m^2) (the
  ROOT ``TLorentzVector::M`` convention), so the caller sees it, counts it and decides. It is
  never clamped to 0 silently.
- pT = 0 (a vector along the beam) has an infinite pseudorapidity. It gets eta =
  ``+-ETA_AT_ZERO_PT`` with the sign of pz, and eta = 0 when pz is 0 as well.
- phi lies in [-pi, pi). ``phi_float32`` also keeps the range after the cast to float32, where
  float32(pi) is larger than pi.
- A particle with a NaN or infinite component is dropped by ``finite_mask`` and counted by the
  caller; the helpers never propagate it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# float32 stores E^2 with a relative error of 2^-24 (6e-8); E^2 - |p|^2 carries a few such errors,
# so 1e-6 * E^2 covers float32 rounding with margin. The absolute term covers soft photons, whose
# E^2 is too small for the relative term to matter. Anything beyond is physics, not rounding.
MASS2_REL_TOLERANCE = 1e-6
MASS2_ABS_TOLERANCE = 1e-3  # GeV^2
# Pseudorapidity given to pT = 0; far outside every detector (|eta| <= 5) yet a small number.
ETA_AT_ZERO_PT = 10.0

_PHI_MIN_FLOAT32 = np.nextafter(np.float32(-np.pi), np.float32(0.0))
_PHI_MAX_FLOAT32 = np.nextafter(np.float32(np.pi), np.float32(0.0))


@dataclass
class Kinematics:
    """Collider coordinates of N four-vectors, all (N,) float64, plus the spacelike flag."""

    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    m: np.ndarray
    spacelike: np.ndarray  # bool: m^2 below the rounding tolerance; m holds -sqrt(-m^2)


def finite_mask(*columns: np.ndarray) -> np.ndarray:
    """Return a bool mask, True where every column is finite (neither NaN nor infinite)."""
    mask = np.ones(np.shape(columns[0]), dtype=bool)
    for column in columns:
        mask &= np.isfinite(column)
    return mask


def wrap_phi(phi: np.ndarray) -> np.ndarray:
    """Wrap angles in radians into [-pi, pi), in float64."""
    wrapped = np.mod(np.asarray(phi, dtype=np.float64) + np.pi, 2.0 * np.pi) - np.pi
    # mod can return 2 pi for inputs just below a multiple of 2 pi, which lands exactly on pi.
    return np.where(wrapped >= np.pi, wrapped - 2.0 * np.pi, wrapped)


def phi_float32(phi: np.ndarray) -> np.ndarray:
    """Wrap into [-pi, pi) and cast to float32 so that the float32 values stay in the range.

    float32(pi) > pi and float32(-pi) < -pi, so values within one float32 step of either edge are
    moved onto the last float32 inside the range: a change below 3e-7 rad.
    """
    wrapped = wrap_phi(phi).astype(np.float32)
    return np.clip(wrapped, _PHI_MIN_FLOAT32, _PHI_MAX_FLOAT32)


def pseudorapidity(pt: np.ndarray, pz: np.ndarray) -> np.ndarray:
    """Return eta = asinh(pz / pT), with ``+-ETA_AT_ZERO_PT`` where pT = 0 (0 if pz = 0 too)."""
    pt = np.asarray(pt, dtype=np.float64)
    pz = np.asarray(pz, dtype=np.float64)
    zero = pt <= 0.0
    safe_pt = np.where(zero, 1.0, pt)
    eta = np.arcsinh(pz / safe_pt)
    return np.where(zero, np.sign(pz) * ETA_AT_ZERO_PT, eta)


def invariant_mass(m2: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (m, spacelike) from m^2 and E; see the module docstring for the tolerance."""
    m2 = np.asarray(m2, dtype=np.float64)
    e = np.asarray(e, dtype=np.float64)
    tolerance = MASS2_ABS_TOLERANCE + MASS2_REL_TOLERANCE * e * e
    spacelike = m2 < -tolerance
    m = np.where(spacelike, -np.sqrt(np.abs(m2)), np.sqrt(np.maximum(m2, 0.0)))
    return m, spacelike


def to_pt_eta_phi_m(px: np.ndarray, py: np.ndarray, pz: np.ndarray,
                    e: np.ndarray) -> Kinematics:
    """Convert (px, py, pz, E) in GeV to pT, eta, phi in [-pi, pi) and m.

    Inputs must be finite (filter with ``finite_mask`` first); a non-finite input raises
    ValueError naming the first bad index, because a NaN would otherwise reach a token.
    """
    px, py, pz, e = (np.asarray(c, dtype=np.float64) for c in (px, py, pz, e))
    good = finite_mask(px, py, pz, e)
    if not good.all():
        index = int(np.argmin(good))
        raise ValueError(
            f"four-vector {index} has a non-finite component "
            f"(px, py, pz, E) = ({px[index]}, {py[index]}, {pz[index]}, {e[index]}); "
            "drop such particles with finite_mask before converting"
        )
    pt = np.hypot(px, py)
    phi = wrap_phi(np.arctan2(py, px))
    m, spacelike = invariant_mass(e * e - (pt * pt + pz * pz), e)
    return Kinematics(pt=pt, eta=pseudorapidity(pt, pz), phi=phi, m=m, spacelike=spacelike)


def to_px_py_pz_e(pt: np.ndarray, eta: np.ndarray, phi: np.ndarray,
                  m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Convert (pT, eta, phi, m) to (px, py, pz, E); a negative m counts as 0."""
    pt, eta, phi, m = (np.asarray(c, dtype=np.float64) for c in (pt, eta, phi, m))
    px = pt * np.cos(phi)
    py = pt * np.sin(phi)
    pz = pt * np.sinh(eta)
    e = np.sqrt(px * px + py * py + pz * pz + np.maximum(m, 0.0) ** 2)
    return px, py, pz, e


def delta_r(eta1: np.ndarray, phi1: np.ndarray, eta2: np.ndarray,
            phi2: np.ndarray) -> np.ndarray:
    """Return the angular distance sqrt(deta^2 + dphi^2), with dphi wrapped into [-pi, pi)."""
    return np.hypot(np.asarray(eta1) - eta2, wrap_phi(np.asarray(phi1) - phi2))
