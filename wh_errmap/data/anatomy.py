"""The geometric heart model of the synthetic phantom: shapes, structures, per-case variation.

A heart lives in template millimetres, RAS+ (x toward the patient's Right, y Anterior, z
Superior), built from truncated ellipsoids (chambers, myocardium) and tubes (outflow tracts,
great vessels, veins), with the origin at the mitral valve and the long axis pointing
left-anterior-inferior from base to apex. Each case draws a global scale, per-structure size
and position jitter, a small rotation and a translation, and a smooth random deformation (a
sum of low-frequency sinusoids) that is applied to world coordinates before the shapes are
evaluated, so no two hearts share a template shape exactly.

Rendering the model to a scan (grid, intensities, noise, files) is `phantom.py`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from wh_errmap.data.structures import MMWHS_CODES

MYO, LA, LV, RA, RV, AO, PA = MMWHS_CODES


def unit_vector(v) -> np.ndarray:
  """v scaled to length 1, float64."""
  v = np.asarray(v, np.float64)
  return v / np.linalg.norm(v)


def _perp(v, axis: np.ndarray) -> np.ndarray:
  """The unit component of v perpendicular to the unit vector `axis`."""
  v = np.asarray(v, np.float64)
  return unit_vector(v - (v @ axis) * axis)


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
  """A rotation about a uniformly random axis by an angle uniform in +-max_deg (3x3)."""
  axis = unit_vector(rng.normal(size=3))
  angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _sphere_points(n: int = 4096) -> np.ndarray:
  """(n, 3) nearly uniform unit vectors (Fibonacci lattice)."""
  z = 1 - 2 * (np.arange(n) + 0.5) / n
  phi = np.arange(n) * np.pi * (3 - np.sqrt(5))
  r = np.sqrt(1 - z * z)
  return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


_SPHERE = _sphere_points()
_CIRCLE = np.linspace(0, 2 * np.pi, 64, endpoint=False)
# Outline points lie on the surface; boxes grow by this much to cover the gaps between them.
OUTLINE_SLACK_MM = 2.0


# --- Shapes: evaluated on template coordinates q = (q0, q1, q2), float32 arrays. -----------
# outline() gives surface points whose bounding box, grown by OUTLINE_SLACK_MM, contains the
# shape; boxes of placed and deformed shapes come from those points.

@dataclasses.dataclass(frozen=True)
class Ellipsoid:
  """Points with sum_k ((axes[k] . (q - center)) / radii[k])^2 <= 1, optionally cut by a
  plane: only points with normal . q <= offset are kept (a chamber ends at its valve plane).
  """
  center: np.ndarray
  axes: np.ndarray    # (3, 3), rows are orthonormal semi-axis directions
  radii: np.ndarray   # (3,)
  cut: tuple[np.ndarray, float] | None = None

  def outline(self) -> np.ndarray:
    points = self.center + (_SPHERE * self.radii) @ self.axes
    if self.cut is not None:
      n, offset = self.cut
      points = points[points @ n <= offset]
    return points

  def grown(self, delta: float) -> Ellipsoid:
    return Ellipsoid(self.center, self.axes, self.radii + delta)

  def inside(self, q) -> np.ndarray:
    level = None
    for axis, radius in zip(self.axes, self.radii):
      a = (axis / radius).astype(np.float32)
      u = a[0] * q[0] + a[1] * q[1] + a[2] * q[2] - np.float32(a @ self.center)
      level = u * u if level is None else level + u * u
    mask = level <= 1
    if self.cut is not None:
      n, offset = self.cut
      n = n.astype(np.float32)
      mask &= n[0] * q[0] + n[1] * q[1] + n[2] * q[2] <= np.float32(offset)
    return mask


def ball(center, radius: float) -> Ellipsoid:
  return Ellipsoid(np.asarray(center, np.float64), np.eye(3), np.full(3, float(radius)))


@dataclasses.dataclass(frozen=True)
class Segment:
  """A truncated cone from a (radius ra) to b (radius rb) with flat ends."""
  a: np.ndarray
  b: np.ndarray
  ra: float
  rb: float

  def outline(self) -> np.ndarray:
    axis = unit_vector(self.b - self.a)
    u = _perp(np.eye(3)[np.argmin(np.abs(axis))], axis)
    ring = np.cos(_CIRCLE)[:, None] * u + np.sin(_CIRCLE)[:, None] * np.cross(axis, u)
    return np.concatenate([self.a + self.ra * ring, self.b + self.rb * ring])

  def inside(self, q) -> np.ndarray:
    ab = self.b - self.a
    length2 = float(ab @ ab)
    w = (ab / length2).astype(np.float32)
    d = [q[k] - np.float32(self.a[k]) for k in range(3)]
    s = w[0] * d[0] + w[1] * d[1] + w[2] * d[2]
    dist2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2] - np.float32(length2) * s * s
    r = np.float32(self.ra) + np.float32(self.rb - self.ra) * s
    return (s >= 0) & (s <= 1) & (dist2 <= r * r)


def tube(points, radii) -> list:
  """A polyline tube: cones between the points, balls at the inner joints, flat ends (so a
  vessel meets its chamber in a valve plane)."""
  points = [np.asarray(p, np.float64) for p in points]
  parts: list = [Segment(points[i], points[i + 1], radii[i], radii[i + 1])
                 for i in range(len(points) - 1)]
  parts += [ball(points[i], radii[i]) for i in range(1, len(points) - 1)]
  return parts


# --- Anatomy. --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Anatomy:
  """A heart in template millimetres plus its placement in the world.

  structures: MMWHS code -> shapes. papillary: dark muscle inside the LV cavity (label LV).
  hull: shapes of the pericardial fat/tissue layer around chambers and great vessels.
  World position p maps to template q = rotation.T @ (p + u(p) - translation) / scale,
  with the displacement u(p) = sum_k amp[k] * sin(2 pi freq[k] . (p - translation) + phase[k]).
  """
  structures: dict
  papillary: list
  hull: list
  scale: float
  rotation: np.ndarray      # (3, 3)
  translation: np.ndarray   # (3,) world mm of the template origin
  amp: np.ndarray           # (K, 3) mm
  freq: np.ndarray          # (K, 3) cycles per mm
  phase: np.ndarray         # (K,)

  def max_displacement(self) -> float:
    return float(np.linalg.norm(self.amp, axis=1).sum())

  def world_bounds(self, shapes) -> tuple[np.ndarray, np.ndarray]:
    """A world box that contains the shapes after placement and deformation."""
    points = np.concatenate([shape.outline() for shape in shapes])
    world = self.translation + self.scale * points @ self.rotation.T
    pad = self.max_displacement() + OUTLINE_SLACK_MM
    return world.min(axis=0) - pad, world.max(axis=0) + pad

  def all_shapes(self) -> list:
    return [s for shapes in self.structures.values() for s in shapes] + self.hull

  def template_coords(self, x, y, z) -> list[np.ndarray]:
    """Template coordinates (3 float32 arrays) of the world points on the broadcast grid
    x (nx, 1, 1), y (1, ny, 1), z (1, 1, nz), all float32 mm."""
    t = self.translation
    u = [np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32) for _ in range(3)]
    for amp, freq, phase in zip(self.amp, self.freq, self.phase):
      f = (2 * np.pi * freq).astype(np.float32)
      wave = np.sin(f[0] * (x - np.float32(t[0])) + f[1] * (y - np.float32(t[1]))
                    + (f[2] * (z - np.float32(t[2])) + np.float32(phase)))
      for k in range(3):
        u[k] += np.float32(amp[k]) * wave
    m = (self.rotation.T / self.scale).astype(np.float32)
    shifted = [x - np.float32(t[0]), y - np.float32(t[1]), z - np.float32(t[2])]
    return [m[i, 0] * (shifted[0] + u[0]) + m[i, 1] * (shifted[1] + u[1])
            + m[i, 2] * (shifted[2] + u[2]) for i in range(3)]


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
  """Draws one heart. Template origin: mitral valve centre; lengths in mm before `scale`."""
  def jit(value, rel=0.06):
    return value * rng.uniform(1 - rel, 1 + rel)

  def shift(mm=3.0):
    return rng.uniform(-mm, mm, 3)

  # Long axis from base to apex, left-anterior-inferior; e2 points from the LV axis toward
  # the RV (right-anterior), e3 completes the frame. A few degrees of per-case tilt.
  d = unit_vector(np.array([-0.61, 0.61, -0.50]) + rng.normal(0, 0.06, 3))
  e2 = _perp([1.0, 0.55, 0.25] + rng.normal(0, 0.06, 3), d)
  e3 = np.cross(d, e2)
  frame = np.stack([d, e2, e3])
  mitral_plane = (-d, 0.0)  # keeps t = d . q >= 0: the ventricular side of the base

  # LV cavity: a prolate ellipsoid whose centre lies c mm below the base plane, cut there.
  c = jit(18.0)
  cavity = Ellipsoid(c * d, frame, np.array([jit(62.0), jit(28.0), jit(26.0)]), mitral_plane)
  wall = rng.uniform(8.5, 10.5)
  epicardium = Ellipsoid(cavity.center, frame,
                          cavity.radii + np.array([wall * 0.9, wall, wall]), mitral_plane)
  # The LV outflow tract rises from the cavity to the aortic valve, anterior-right of the
  # mitral valve and slightly above the base.
  aortic_valve = -3.0 * d + jit(13.0) * _perp([0.3, 1.0, 0.4], d) + shift(2)
  r_ao = rng.uniform(12.0, 14.0)
  lvot = tube([c * d + 8 * e2, aortic_valve], [r_ao - 1, r_ao - 1])
  papillary = []
  for angle in (rng.uniform(2.2, 2.7), rng.uniform(-2.7, -2.2)):
    center = jit(45.0) * d + 17.0 * (np.cos(angle) * e2 + np.sin(angle) * e3)
    papillary.append(Ellipsoid(center, frame, np.array([jit(13.0), jit(5.0), jit(5.0)])))

  # RV: a large ellipsoid beside the LV; the myocardium (painted later) carves the septum so
  # that the remaining blood pool is a crescent. It ends at the tricuspid plane, a little
  # apical of the mitral plane; the outflow tract climbs to the pulmonary valve.
  t_tricuspid = rng.uniform(3.0, 8.0)
  rv_body = Ellipsoid(jit(30.0) * d + jit(25.0) * e2 + 4 * e3 + shift(), frame,
                       np.array([jit(52.0), jit(31.0), jit(48.0)]), (-d, -t_tricuspid))
  pulmonary_valve = aortic_valve + np.array([-16.0, 12.0, 14.0]) + shift(3)
  r_pa = rng.uniform(11.0, 13.0)
  rvot = tube([22 * d + 32 * e2, pulmonary_valve], [r_pa + 2, r_pa])

  # Great vessels. The ascending aorta climbs anterior-right, then bends posterior-left
  # toward the arch; the pulmonary trunk runs superior-left-posterior and splits under it.
  ao = tube([aortic_valve,
              aortic_valve + np.array([7.0, 6.0, 24.0]) + shift(4),
              aortic_valve + np.array([9.0, 0.0, 48.0]) + shift(4),
              aortic_valve + np.array([2.0, -13.0, 60.0]) + shift(4)],
             [r_ao, r_ao + 1, r_ao, r_ao - 1])
  bifurcation = pulmonary_valve + np.array([-10.0, -22.0, 28.0]) + shift(4)
  r_branch = rng.uniform(6.5, 8.5)
  pa = (tube([pulmonary_valve, pulmonary_valve + np.array([-8.0, -8.0, 16.0]) + shift(2),
               bifurcation], [r_pa, r_pa, r_pa - 1])
        + tube([bifurcation, bifurcation + np.array([-24.0, -12.0, 2.0]) + shift(4),
                 bifurcation + np.array([-62.0, -26.0, -6.0]) + shift(4)],
                [r_pa - 1, r_branch, r_branch - 1])
        + tube([bifurcation, bifurcation + np.array([22.0, -18.0, -2.0]) + shift(4),
                 bifurcation + np.array([62.0, -32.0, -8.0]) + shift(4)],
                [r_pa - 1, r_branch, r_branch - 1]))

  # Atria above the base: LA posterior-superior of the LV with four pulmonary veins, RA to
  # its right (superior-posterior of the RV) with the caval veins. Both end at their valve
  # planes; where they touch, the interatrial septum is the LA's surface.
  world_axes = np.eye(3)
  la_center = np.array([-5.0, -30.0, 14.0]) + shift()
  la_body = Ellipsoid(la_center, world_axes, np.array([jit(31.0), jit(22.0), jit(24.0)]),
                       (d, 0.0))
  veins = []
  for side in (-1.0, 1.0):
    for height, r in ((9.0, jit(6.0)), (-9.0, jit(5.5))):
      ostium = la_center + np.array([side * 18.0, -8.0, height])
      end = la_center + np.array([side * 62.0, -32.0, 1.6 * height]) + shift(5)
      veins += tube([ostium, end], [r, r])
  ra_center = np.array([40.0, -6.0, 8.0]) + shift()
  ra_body = Ellipsoid(ra_center, world_axes, np.array([jit(22.0), jit(24.0), jit(27.0)]),
                       (d, t_tricuspid))
  svc = tube([ra_center + np.array([-2.0, -6.0, 20.0]),
               ra_center + np.array([-4.0, -10.0, 58.0]) + shift(4)], [jit(9.5)] * 2)
  ivc = tube([ra_center + np.array([0.0, -8.0, -20.0]),
               ra_center + np.array([0.0, -12.0, -44.0]) + shift(4)], [jit(11.0)] * 2)

  structures = {
      RA: [ra_body] + svc + ivc,
      LA: [la_body] + veins,
      RV: [rv_body] + rvot,
      MYO: [epicardium],
      LV: [cavity] + lvot,
      PA: pa,
      AO: ao,
  }
  # Pericardial fat and tissue: a layer of random thickness around the chambers, and a
  # mediastinal sleeve around the roots of the great vessels.
  fat = rng.uniform(3.0, 9.0)
  hull = [e.grown(fat) for e in (epicardium, rv_body, la_body, ra_body)]
  hull += [ball(aortic_valve + np.array([0.0, 0.0, 25.0]), 30.0 + fat)]

  num_waves = 3
  directions = np.stack([unit_vector(v) for v in rng.normal(size=(num_waves, 3))])
  # Wavelengths >= 110 mm and amplitudes <= 3.5 mm keep the map p -> p + u(p) invertible
  # (sum of 2 pi |amp| / wavelength < 1).
  freq = directions / rng.uniform(110.0, 200.0, (num_waves, 1))
  amp = np.stack([unit_vector(v) for v in rng.normal(size=(num_waves, 3))])
  amp *= rng.uniform(1.5, 3.5, (num_waves, 1))
  return Anatomy(
      structures=structures, papillary=papillary, hull=hull,
      scale=rng.uniform(0.9, 1.1), rotation=_random_rotation(rng, 15.0),
      translation=rng.normal(0.0, 15.0, 3), amp=amp, freq=freq,
      phase=rng.uniform(0, 2 * np.pi, num_waves))

