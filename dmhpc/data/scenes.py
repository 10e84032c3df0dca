"""The physical model behind `dmhpc synth`: galaxies, mergers, tidal features, PSFs, sky and noise.

A scene is a list of components, each a unit-flux GalSim profile placed on the sky (arcsec from the
stamp centre) and its flux in the three filters. Components carry their own colours (bulges red,
disks and tidal debris blue), so a filter's image is one `Convolve(Add(components), psf)`.

Every draw comes from the generator it is given, in an order that does not depend on the difficulty
knobs: a knob changes only what it names (a brighter tail, a neighbour switched on), never the rest
of the object. docs/embedded-data.md describes the model and its numbers.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import galsim
import numpy as np

from dmhpc.checks import number

STAMP = 75  # pixels on a side
PIXEL_SCALE = 0.06  # arcsec per pixel; 75 pixels = 4.5" = 38 kpc at z = 2
ZERO_POINT = 28.9  # AB magnitude of one image unit: 1 unit = 10 nJy (28.9 = 31.4 - 2.5)
REFERENCE_MAG = 23.25  # F160W magnitude at which the size relations below are quoted


class Knobs(NamedTuple):
    """Difficulty knobs: the domain gap (sb_limit) and how much the two classes overlap (the rest)."""

    sb_limit: float = 25.0  # mag/arcsec^2; the noisy domain's 1-sigma sky noise per pixel
    tidal_strength: float = 1.0  # multiplies the flux of every tidal feature
    neighbour_fraction: float = 0.3  # fraction of non-mergers with an unrelated faint neighbour
    minor_fraction: float = 0.3  # fraction of mergers that are minor (flux ratio 1:10 to 1:4)
    triple_fraction: float = 0.15  # fraction of mergers with a third galaxy


DEFAULT_KNOBS = Knobs()
# The range over which the model above is meant: brighter skies than 18 or fainter than 35
# mag/arcsec^2 leave the regime the noise model and the PSF sizes were set for.
KNOB_CHECKS = {
    "sb_limit": number(18.0, 35.0, unit="mag/arcsec^2"),
    "tidal_strength": number(0.0, 1000.0),  # (1e20 ended in numpy's Poisson "lam value too large")
    "neighbour_fraction": number(0.0, 1.0),
    "minor_fraction": number(0.0, 1.0),
    "triple_fraction": number(0.0, 1.0),
}


class Filter(NamedTuple):
    name: str
    instrument: str
    wavelength_nm: float
    diameter_m: float  # primary mirror: sets the diffraction pattern
    obscuration: float  # linear central obscuration of the pupil
    blur_arcsec: float  # Gaussian sigma for detector diffusion, jitter and drizzling
    sky_mag_arcsec2: float  # typical zodiacal-dominated sky surface brightness (AB)


# Channel order of every image: F814W, F356W, F160W (DeepMerge's order).
FILTERS = (
    Filter("F814W", "HST/ACS-WFC", 814.0, 2.4, 0.33, 0.03, 22.5),
    Filter("F356W", "JWST/NIRCam", 3560.0, 6.5, 0.11, 0.03, 22.2),
    Filter("F160W", "HST/WFC3-IR", 1600.0, 2.4, 0.33, 0.06, 22.3),
)

# Looser than GalSim's defaults (5e-3, 1e-3): images change by < 1e-4 of their peak, far below any
# noise, and drawing is ~4x faster (smaller FFT boxes for scenes with far-flung tidal features).
GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=3e-3)

# Colours relative to F160W, as (F814W - F160W, F356W - F160W) ranges in AB magnitudes. At z = 2,
# F814W samples the rest-frame UV and F160W lies just redward of the 4000 A break: old bulges are
# faint in F814W, star-forming disks, clumps and tidal debris are bluer.
DISK_COLOURS = ((0.4, 1.2), (-0.7, -0.2))
BULGE_COLOURS = ((1.8, 2.8), (-1.3, -0.8))
YOUNG_COLOURS = ((0.0, 0.6), (-0.3, 0.1))
FIELD_COLOURS = ((0.0, 2.5), (-1.2, 0.2))  # an unrelated galaxy at another redshift

DISK_THICKNESS = 0.3  # intrinsic axis ratio of edge-on disks at z = 2 (thick, turbulent disks)


Component = tuple[galsim.GSObject, np.ndarray]  # unit-flux profile, flux per filter


def flux(mag: float) -> float:
    """Total flux in image units of a source of AB magnitude `mag`."""
    return 10.0 ** (-0.4 * (mag - ZERO_POINT))


def _colour_fluxes(rng: np.random.Generator, flux160: float, colours) -> np.ndarray:
    (lo814, hi814), (lo356, hi356) = colours
    c814, c356 = rng.uniform(lo814, hi814), rng.uniform(lo356, hi356)
    return flux160 * 10.0 ** (-0.4 * np.array([c814, c356, 0.0]))


def _sersic_index(value: float) -> float:
    # GalSim tabulates each Sersic index once per process (~10 ms); a 0.1 grid keeps that cache hot.
    return round(min(max(value, 0.5), 6.0), 1)


def _clumps(rng: np.random.Generator, flux160: float, r_half: float, q: float, pa: float) -> list[Component]:
    """Star-forming clumps of a z = 2 disk: compact, blue, a few per cent of its light each."""
    out = []
    for _ in range(rng.integers(1, 5)):
        r = r_half * abs(rng.normal(0.0, 0.9))
        phi = rng.uniform(0.0, 2.0 * math.pi)
        x, y = r * math.cos(phi), q * r * math.sin(phi)  # in the inclined disk's plane
        c, s = math.cos(pa), math.sin(pa)
        sigma = rng.uniform(0.03, 0.06)
        fluxes = _colour_fluxes(rng, flux160 * rng.uniform(0.02, 0.06), YOUNG_COLOURS)
        out.append((galsim.Gaussian(sigma=sigma, gsparams=GSPARAMS).shift(c * x - s * y, s * x + c * y), fluxes))
    return out


def galaxy(rng: np.random.Generator, flux160: float, *, size_scale: float = 1.0, colours=None) -> list[Component]:
    """One galaxy centred on the origin: a bulge + exponential disk (65%) or a single Sersic profile.

    Sizes follow r_half ~ L^0.25 with log-normal scatter (sigma 0.3 in ln r); disks are randomly
    inclined thick disks; half of the bulge + disk galaxies carry star-forming clumps. `colours`
    draws the bulge's and disk's colours from one range (an unrelated galaxy at another redshift);
    otherwise bulges are red and disks blue.
    """
    lum = (flux160 / flux(REFERENCE_MAG)) ** 0.25
    pa = rng.uniform(0.0, math.pi)
    beta = pa * galsim.radians
    if rng.uniform() < 0.65:
        r_disk = float(np.clip(0.28 * lum * rng.lognormal(0.0, 0.3) * size_scale, 0.06, 0.9))
        cos_i = rng.uniform()
        q_disk = math.sqrt(DISK_THICKNESS**2 + (1.0 - DISK_THICKNESS**2) * cos_i**2)
        bulge_to_total = rng.uniform(0.05, 0.6)
        r_bulge = max(r_disk * rng.uniform(0.15, 0.45), 0.02)
        n_bulge = _sersic_index(rng.uniform(2.5, 4.5))
        q_bulge = rng.uniform(0.6, 1.0)
        disk_flux = (1.0 - bulge_to_total) * flux160
        comps = [
            (galsim.Exponential(half_light_radius=r_disk, gsparams=GSPARAMS).shear(q=q_disk, beta=beta),
             _colour_fluxes(rng, disk_flux, colours or DISK_COLOURS)),
            (galsim.Sersic(n=n_bulge, half_light_radius=r_bulge, gsparams=GSPARAMS).shear(q=q_bulge, beta=beta),
             _colour_fluxes(rng, bulge_to_total * flux160, colours or BULGE_COLOURS)),
        ]
        if rng.uniform() < 0.5:
            comps += _clumps(rng, disk_flux, r_disk, q_disk, pa)
        return comps
    n = _sersic_index(10.0 ** rng.uniform(math.log10(0.6), math.log10(5.0)))
    r_half = float(np.clip(0.22 * lum * rng.lognormal(0.0, 0.3) * size_scale / (1.0 + 0.15 * (n - 1.0)), 0.04, 0.8))
    q = rng.uniform(0.35, 1.0)
    if colours is None:
        # Concentrated (high-n) galaxies are old and red, exponential ones blue.
        t = min(max((n - 1.0) / 3.0, 0.0), 1.0)
        colours = tuple(
            (lo_d + t * (lo_b - lo_d), hi_d + t * (hi_b - hi_d))
            for (lo_d, hi_d), (lo_b, hi_b) in zip(DISK_COLOURS, BULGE_COLOURS)
        )
    return [(galsim.Sersic(n=n, half_light_radius=r_half, gsparams=GSPARAMS).shear(q=q, beta=beta),
             _colour_fluxes(rng, flux160, colours))]


def _place(comps: list[Component], x: float, y: float, stretch: tuple[float, float] | None = None) -> list[Component]:
    """Move a galaxy to (x, y) arcsec, first stretching it along an axis (tidal distortion)."""
    out = []
    for prof, fluxes in comps:
        if stretch is not None:
            prof = prof.shear(g=stretch[0], beta=stretch[1] * galsim.radians)
        out.append((prof.shift(x, y), fluxes))
    return out


def _knot_chain(rng, points: np.ndarray, sigmas: np.ndarray, weights: np.ndarray, flux160: float) -> list[Component]:
    """Debris along a path: a chain of overlapping faint Gaussian knots sharing one blue colour."""
    fluxes = _colour_fluxes(rng, 1.0, YOUNG_COLOURS)
    weights = weights / weights.sum()
    return [
        (galsim.Gaussian(sigma=float(s), gsparams=GSPARAMS).shift(float(x), float(y)), fluxes * (flux160 * w))
        for (x, y), s, w in zip(points, sigmas, weights)
    ]


def tidal_tail(rng, x0: float, y0: float, heading: float, flux160: float) -> list[Component]:
    """A curved tidal tail leaving (x0, y0) along `heading`: knots on a circular arc, fading outwards."""
    radius = rng.uniform(0.4, 1.4)  # radius of curvature, arcsec
    turn = rng.choice((-1.0, 1.0))
    length = rng.uniform(0.6, 1.6)
    n = max(int(length / 0.1), 4)
    s = (np.arange(n) + 0.5) * (length / n)
    theta = heading + turn * s / radius
    x = x0 + turn * radius * (np.sin(theta) - math.sin(heading))
    y = y0 - turn * radius * (np.cos(theta) - math.cos(heading))
    sigmas = np.linspace(0.05, rng.uniform(0.08, 0.14), n)
    weights = np.exp(-s / rng.uniform(0.4, 1.0)) * rng.uniform(0.6, 1.4, n)
    return _knot_chain(rng, np.stack([x, y], axis=1), sigmas, weights, flux160)


def tidal_bridge(rng, a: tuple[float, float], b: tuple[float, float], flux160: float) -> list[Component]:
    """A faint, slightly bowed bridge of knots between two interacting galaxies."""
    (xa, ya), (xb, yb) = a, b
    sep = math.hypot(xb - xa, yb - ya)
    n = max(int(sep / 0.1), 3)
    t = (np.arange(n) + 0.5) / n
    bow = rng.uniform(-0.3, 0.3) * sep * 4.0 * t * (1.0 - t)  # perpendicular offset, zero at the ends
    nx, ny = -(yb - ya) / sep, (xb - xa) / sep
    points = np.stack([xa + t * (xb - xa) + bow * nx, ya + t * (yb - ya) + bow * ny], axis=1)
    sigmas = np.full(n, rng.uniform(0.05, 0.09))
    return _knot_chain(rng, points, sigmas, rng.uniform(0.5, 1.5, n), flux160)


def tidal_plume(rng, x0: float, y0: float, direction: float, flux160: float) -> list[Component]:
    """A smooth sheared plume or shell: an elongated exponential offset from its host towards `direction`."""
    offset = rng.uniform(0.15, 0.5)
    prof = (galsim.Exponential(half_light_radius=rng.uniform(0.25, 0.7), gsparams=GSPARAMS)
            .shear(q=rng.uniform(0.15, 0.45), beta=(direction + math.pi / 2 + rng.normal(0.0, 0.4)) * galsim.radians)
            .shift(x0 + offset * math.cos(direction), y0 + offset * math.sin(direction)))
    return [(prof, _colour_fluxes(rng, flux160, YOUNG_COLOURS))]


def _primary(rng: np.random.Generator) -> tuple[float, float, float]:
    """Flux and sub-pixel centre of the central galaxy (the image is centred on it, as in Illustris)."""
    flux160 = flux(rng.uniform(22.0, 24.5))
    x, y = rng.uniform(-0.5, 0.5, 2) * PIXEL_SCALE
    return flux160, float(x), float(y)


def merger(streams: list[np.random.Generator], knobs: Knobs) -> list[Component]:
    """Two (sometimes three) galaxies at merger separations and flux ratios, with tidal features."""
    main_rng, companion_rng, tidal_rng = streams
    flux1, x1, y1 = _primary(main_rng)
    first = galaxy(main_rng, flux1)

    minor = companion_rng.uniform() < knobs.minor_fraction
    u = companion_rng.uniform()
    ratio = 0.1 + 0.15 * u if minor else 0.25 + 0.75 * u
    sep = 10.0 ** companion_rng.uniform(math.log10(0.1), math.log10(1.3))  # 0.8-11 kpc projected
    angle = companion_rng.uniform(0.0, 2.0 * math.pi)
    x2, y2 = x1 + sep * math.cos(angle), y1 + sep * math.sin(angle)
    second = galaxy(companion_rng, ratio * flux1)
    triple = companion_rng.uniform() < knobs.triple_fraction
    ratio3 = companion_rng.uniform(0.1, 0.5)
    sep3 = 10.0 ** companion_rng.uniform(math.log10(0.3), math.log10(1.6))
    angle3 = companion_rng.uniform(0.0, 2.0 * math.pi)
    third = galaxy(companion_rng, ratio3 * flux1)

    # Tides stretch both galaxies along the line joining them, more so when they are close.
    stretch = tidal_rng.uniform(0.05, 0.25) * min(1.0, 0.4 / sep) ** 0.5
    comps = _place(first, x1, y1, (stretch, angle)) + _place(second, x2, y2, (stretch, angle))
    if triple:
        comps += _place(third, x1 + sep3 * math.cos(angle3), y1 + sep3 * math.sin(angle3))

    # Features are always drawn, then kept or not, so that tidal_strength only rescales them.
    strength = knobs.tidal_strength
    hosts = ((x1, y1, flux1, angle + math.pi), (x2, y2, ratio * flux1, angle))  # position, flux, away from partner
    for keep_probability in (0.9, 0.5):
        hx, hy, hflux, away = hosts[int(tidal_rng.uniform() < 0.5)]
        heading = away + tidal_rng.uniform(-1.0, 1.0)
        start = tidal_rng.uniform(0.1, 0.2)
        tail = tidal_tail(tidal_rng, hx + start * math.cos(heading), hy + start * math.sin(heading), heading,
                          hflux * tidal_rng.uniform(0.04, 0.12) * strength)
        if tidal_rng.uniform() < keep_probability:
            comps += tail
    plume = tidal_plume(tidal_rng, x1, y1, angle + math.pi + tidal_rng.normal(0.0, 0.8),
                        flux1 * tidal_rng.uniform(0.03, 0.10) * strength)
    if tidal_rng.uniform() < 0.5:
        comps += plume
    bridge = tidal_bridge(tidal_rng, (x1, y1), (x2, y2), flux1 * tidal_rng.uniform(0.02, 0.06) * strength)
    if sep > 0.35 and tidal_rng.uniform() < 0.4:
        comps += bridge
    return comps


def non_merger(streams: list[np.random.Generator], knobs: Knobs) -> list[Component]:
    """One galaxy, sometimes with an unrelated fainter galaxy projected nearby (no tidal features)."""
    main_rng, neighbour_rng, _ = streams
    flux1, x1, y1 = _primary(main_rng)
    comps = _place(galaxy(main_rng, flux1), x1, y1)
    has_neighbour = neighbour_rng.uniform() < knobs.neighbour_fraction
    ratio = 10.0 ** neighbour_rng.uniform(math.log10(0.05), math.log10(0.4))
    sep = 10.0 ** neighbour_rng.uniform(math.log10(0.5), math.log10(2.0))
    angle = neighbour_rng.uniform(0.0, 2.0 * math.pi)
    neighbour = galaxy(neighbour_rng, ratio * flux1, size_scale=neighbour_rng.uniform(0.4, 0.8), colours=FIELD_COLOURS)
    if has_neighbour:
        comps += _place(neighbour, x1 + sep * math.cos(angle), y1 + sep * math.sin(angle))
    return comps


@functools.cache
def psfs() -> tuple[galsim.GSObject, ...]:
    """Per filter: diffraction by the obscured pupil (Airy) blurred by a Gaussian for the detector."""
    return tuple(
        galsim.Convolve(
            galsim.Airy(lam=f.wavelength_nm, diam=f.diameter_m, obscuration=f.obscuration, gsparams=GSPARAMS),
            galsim.Gaussian(sigma=f.blur_arcsec, gsparams=GSPARAMS),
        )
        for f in FILTERS
    )


def psf_fwhm(index: int) -> float:
    """FWHM in arcsec of filter `index`'s PSF (before the pixel), measured on a fine grid."""
    image = psfs()[index].drawImage(nx=401, ny=401, scale=0.002, method="no_pixel")
    return float(image.calculateFWHM())


def draw(comps: list[Component]) -> np.ndarray:
    """The noiseless (pristine) image, (3, STAMP, STAMP) float32: one PSF-convolved draw per filter."""
    out = np.empty((len(FILTERS), STAMP, STAMP), dtype=np.float32)
    for i, psf in enumerate(psfs()):
        scene = galsim.Add([prof * float(fluxes[i]) for prof, fluxes in comps])
        galsim.Convolve(scene, psf).drawImage(image=galsim.ImageF(out[i], scale=PIXEL_SCALE))
    return out


def noise_sigma(sb_limit: float) -> float:
    """Sky noise per pixel (image units): one pixel's flux at surface brightness `sb_limit` mag/arcsec^2."""
    return flux(sb_limit) * PIXEL_SCALE**2


def sky_per_pixel(f: Filter) -> float:
    """Sky level per pixel (image units) of filter `f`."""
    return flux(f.sky_mag_arcsec2) * PIXEL_SCALE**2


# The fewest sky counts per pixel the gain may give. A sky-limited gain (B / sigma^2) gives (B/sigma)^2
# counts: 100 in F814W at SB25, but under one at SB22.5. Poisson noise of so few counts is no Gaussian
# sky: at SB18 every sky pixel read -B, and the galaxy was one spike or nothing. Below this many
# counts the gain stays here and read noise makes up the rest of sigma.
MIN_SKY_COUNTS = 50.0


def _sky_limited(f: Filter, sb_limit: float) -> bool:
    """Whether the sky alone, at the gain that makes its Poisson noise `noise_sigma(sb_limit)`, has
    MIN_SKY_COUNTS counts or more (every filter from SB 24.63 on)."""
    return (sky_per_pixel(f) / noise_sigma(sb_limit)) ** 2 >= MIN_SKY_COUNTS


def gain(f: Filter, sb_limit: float) -> float:
    """Detected counts per image unit: the sky's Poisson noise is `noise_sigma(sb_limit)` where that
    leaves the sky at least MIN_SKY_COUNTS counts; else the gain giving that many (see `read_noise`)."""
    sky = sky_per_pixel(f)
    return sky / noise_sigma(sb_limit) ** 2 if _sky_limited(f, sb_limit) else MIN_SKY_COUNTS / sky


def read_noise(f: Filter, sb_limit: float) -> float:
    """The Gaussian noise per pixel (image units) added to the sky's Poisson noise so that the two
    make `noise_sigma(sb_limit)`; exactly 0 where the sky alone does (computed, it was 1e-9 at some
    limits, and a normal draw shifted their noise streams)."""
    if _sky_limited(f, sb_limit):
        return 0.0
    return math.sqrt(max(noise_sigma(sb_limit) ** 2 - sky_per_pixel(f) / gain(f, sb_limit), 0.0))


def observe(pristine: np.ndarray, rng: np.random.Generator, sb_limit: float) -> np.ndarray:
    """The noisy twin: Poisson counts of source + sky, converted back to image units, sky subtracted,
    plus read noise where the sky is too bright a limit's noise for its counts (see `gain`)."""
    out = np.empty_like(pristine)
    for i, f in enumerate(FILTERS):
        sky, g, read = sky_per_pixel(f), gain(f, sb_limit), read_noise(f, sb_limit)
        # FFT drawing can ring slightly below zero far from sources; a Poisson mean cannot.
        mean = g * (np.maximum(pristine[i].astype(np.float64), 0.0) + sky)
        counts = rng.poisson(mean) / g - sky
        # Only where there is read noise does the stream draw it: limits without any keep their bytes.
        out[i] = counts + rng.normal(0.0, read, counts.shape) if read > 0 else counts
    return out


# ----------------------------------------------------------------------------- a survey-like target
# The same kind of scenes seen as a ground-based imaging survey would see them, and drawn from a
# shifted population, so that both the observation and the galaxies differ (as simulation -> SDSS
# does in DeepMerge II). docs/embedded-data.md, "The survey-like domain", gives the reasons for the
# numbers and how this differs from SDSS.


class SurveyFilter(NamedTuple):
    name: str
    wavelength_nm: float
    seeing_fwhm_arcsec: float  # atmospheric seeing, a Moffat profile; worse in the blue
    sky_mag_arcsec2: float  # a dark-time ground-based sky, far brighter than from space


SURVEY_FILTERS = (
    SurveyFilter("g", 477.0, 0.80, 22.0),
    SurveyFilter("r", 623.0, 0.72, 21.1),
    SurveyFilter("i", 770.0, 0.65, 20.3),
)
SURVEY_PIXEL_SCALE = 0.168  # arcsec per native pixel, 2.8x the simulation's
SURVEY_NATIVE = 64  # native pixels on a side: a 10.75" cutout, resampled to STAMP x STAMP
SURVEY_ZERO_POINT = 27.0  # AB magnitude of one survey image unit (one count of a coadd)
SURVEY_SB_LIMIT = 28.0  # surface brightness of the 1-sigma sky noise per native pixel (as noise_sigma)
MOFFAT_BETA = 3.5
# Sim bands whose fluxes set each component's spectrum: f_nu ~ lambda^alpha between F814W and F160W,
# extended to g, r and i (blueward of F814W an extrapolation: red bulges fade fast in g).
_SED_BANDS = (814.0, 1600.0)


class Population(NamedTuple):
    """How the survey's galaxies differ from the simulation's (besides how they are observed)."""

    scale: tuple[float, float] = (2.0, 3.0)  # angular dilation of the scene: a lower redshift
    brighter_mag: tuple[float, float] = (2.0, 3.0)  # and so brighter
    merger_fraction: float = 0.6  # a sample selected for merger candidates; the simulated set is 50/50
    minor_fraction: float = 0.4  # more minor mergers (flux ratio 1:10 to 1:4) among them
    neighbour_fraction: float = 0.4  # more unrelated projected neighbours in a wide field


SURVEY_POPULATION = Population()


def survey_fluxes(sim_fluxes: np.ndarray, brighter_mag: float) -> np.ndarray:
    """A component's (F814W, F356W, F160W) fluxes in simulation units -> (g, r, i) in survey units."""
    f814, f160 = max(float(sim_fluxes[0]), 1e-30), max(float(sim_fluxes[2]), 1e-30)
    alpha = math.log(f814 / f160) / math.log(_SED_BANDS[0] / _SED_BANDS[1])
    units = 10.0 ** (-0.4 * (ZERO_POINT - SURVEY_ZERO_POINT - brighter_mag))
    return np.array([f814 * (f.wavelength_nm / _SED_BANDS[0]) ** alpha * units for f in SURVEY_FILTERS])


def survey_label(rng: np.random.Generator, population: Population = SURVEY_POPULATION) -> int:
    return int(rng.uniform() < population.merger_fraction)


def survey_knobs(knobs: Knobs, population: Population = SURVEY_POPULATION) -> Knobs:
    """The simulation's knobs with the survey population's fractions (the tidal strength stays)."""
    return knobs._replace(minor_fraction=population.minor_fraction, neighbour_fraction=population.neighbour_fraction)


def draw_survey(comps: list[Component], rng: np.random.Generator,
                population: Population = SURVEY_POPULATION) -> np.ndarray:
    """The noiseless survey image at native resolution, (3, SURVEY_NATIVE, SURVEY_NATIVE) float32."""
    scale = rng.uniform(*population.scale)
    brighter = rng.uniform(*population.brighter_mag)
    fluxes = [survey_fluxes(f, brighter) for _, f in comps]
    out = np.empty((len(SURVEY_FILTERS), SURVEY_NATIVE, SURVEY_NATIVE), dtype=np.float32)
    for i, f in enumerate(SURVEY_FILTERS):
        scene = galsim.Add([prof * float(fl[i]) for (prof, _), fl in zip(comps, fluxes)]).dilate(scale)
        psf = galsim.Moffat(beta=MOFFAT_BETA, fwhm=f.seeing_fwhm_arcsec, gsparams=GSPARAMS)
        galsim.Convolve(scene, psf).drawImage(image=galsim.ImageF(out[i], scale=SURVEY_PIXEL_SCALE))
    return out


def survey_sky_per_pixel(f: SurveyFilter) -> float:
    return 10.0 ** (-0.4 * (f.sky_mag_arcsec2 - SURVEY_ZERO_POINT)) * SURVEY_PIXEL_SCALE**2


def survey_noise_sigma() -> float:
    return 10.0 ** (-0.4 * (SURVEY_SB_LIMIT - SURVEY_ZERO_POINT)) * SURVEY_PIXEL_SCALE**2


def observe_survey(native: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sky and Poisson noise on the native pixels, sky subtracted, then resampled (cubic) to the
    network's STAMP x STAMP: the noise is drawn where the detector has its pixels, so resampling
    correlates it, as in a survey's resampled cutouts."""
    from scipy.ndimage import zoom

    sigma = survey_noise_sigma()
    out = np.empty((len(SURVEY_FILTERS), STAMP, STAMP), dtype=np.float32)
    for i, f in enumerate(SURVEY_FILTERS):
        sky = survey_sky_per_pixel(f)
        g = sky / sigma**2
        noisy = rng.poisson(g * (np.maximum(native[i].astype(np.float64), 0.0) + sky)) / g - sky
        out[i] = zoom(noisy, STAMP / SURVEY_NATIVE, order=3, mode="nearest", grid_mode=True)
    return out
