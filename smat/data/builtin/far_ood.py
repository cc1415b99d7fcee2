"""Far-OOD domains: image sources and renderers that no training domain uses.

Every training domain (pre-training and meta-training) is drawn by one of two
generators: glyphs in the DejaVu and STIX fonts, filled strokes, grey, dark on
light, distorted by a batched affine warp (:mod:`.glyphs`); or procedural
shapes, textures and families in two flat colours with mild pixel noise
(:mod:`.shapes`, :mod:`.pretrain_families`). The domains here share neither
the source, the fonts, the renderer nor the procedural family:

- ``photo_patches``: real photographs (scikit-learn's ``china.jpg`` and
  ``flower.jpg``, matplotlib's ``grace_hopper.jpg``). A class is one region of
  one photo, chosen by hand to be visually distinct (the pagoda's roof, the
  lake, the dahlia's centre, the flag's stars, the glasses …); instances are
  random square crops inside the region with a small rotation, mirror and
  brightness change.
- ``scan_patches``: real measured images in grey, from matplotlib's sample
  data: a sagittal MRI slice of a head (``s1045.ima.gz``) and the
  hill-shaded elevation model of a terrain (``jacksboro_fault_dem.npz``,
  shaded by matplotlib's ``LightSource``). A class is one anatomical or
  terrain region (cortex folds, cerebellum, cheek, fault ridge …); instances
  are crops as for the photos.
- ``cm_outline``: numerals and signs in the Computer Modern typefaces that
  matplotlib ships for mathtext (cmr10, cmss10, cmtt10, cmti10, cmb10; never
  used in training), drawn as hollow outlines (stroke only, no fill) in a
  colour on a two-colour gradient background.
- ``lowres_inverted``: the same numerals and signs in Pillow's own fonts
  (Aileron, its scalable default, and its bitmap default font), light on a
  dark, noisy gradient, rendered at 12–16 pixels then enlarged (blocky or
  blurred), with strong sensor-like noise.

The character classes of the two typeface domains are digits and ASCII
signs: pre-training excludes every digit and meta-training's scripts have
neither (``tests/test_data_far_ood.py`` checks that none looks like a training
character). ``digits`` (scikit-learn's handwriting, :mod:`.digits`) is the
fourth far-OOD domain.
"""

from __future__ import annotations

import functools
import os
import unicodedata

import matplotlib
import matplotlib.cbook
import matplotlib.colors
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sklearn.datasets import load_sample_images

CANVAS = 64

# ---------------------------------------------------------------- real photographs

# (photo, class name, box (left, top, right, bottom) in the photo's pixels)
PHOTO_REGIONS: tuple[tuple[str, str, tuple[int, int, int, int]], ...] = (
    ("china", "pagoda roof", (95, 60, 320, 140)),
    ("china", "pagoda lower storeys", (70, 250, 350, 340)),
    ("china", "lake and boats", (340, 215, 545, 300)),
    ("china", "tree against sky", (545, 140, 640, 300)),
    ("china", "treetops below", (330, 320, 560, 427)),
    ("china", "bushes left", (0, 335, 200, 427)),
    ("flower", "dahlia centre", (265, 165, 360, 260)),
    ("flower", "dahlia petals", (175, 95, 285, 340)),
    ("flower", "teal bokeh", (0, 0, 160, 427)),
    ("flower", "buds below", (290, 372, 470, 427)),
    ("grace_hopper", "flag stars", (0, 0, 140, 280)),
    ("grace_hopper", "flag stripes", (0, 290, 130, 420)),
    ("grace_hopper", "blue backdrop", (390, 0, 512, 380)),
    ("grace_hopper", "cap badge", (180, 20, 345, 100)),
    ("grace_hopper", "eyes and glasses", (170, 165, 360, 225)),
    ("grace_hopper", "mouth and chin", (200, 240, 330, 330)),
    ("grace_hopper", "ribbons", (320, 485, 455, 530)),
    ("grace_hopper", "collar and tie", (200, 380, 320, 500)),
    ("grace_hopper", "dark jacket", (360, 530, 512, 600)),
)


@functools.cache
def photos() -> dict[str, np.ndarray]:
    """The photographs the dependencies ship, uint8 H×W×3: scikit-learn's two, matplotlib's one."""
    china, flower = load_sample_images().images
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
        grace = np.asarray(image.convert("RGB"))
    return {"china": china, "flower": flower, "grace_hopper": grace}


PAD = 64  # pictures are mirrored outwards by this much, so that a rotated crop at an edge shows no black corner


def _padded(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.pad(array, [(PAD, PAD), (PAD, PAD)] + [(0, 0)] * (array.ndim - 2), mode="reflect"))


def _photo_crop(photo: Image.Image, box, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random square crop inside ``box`` (the picture's pixels; ``photo`` is the picture padded by PAD)."""
    left, top, right, bottom = box
    side = rng.uniform(0.55, 0.9) * min(right - left, bottom - top)
    x = PAD + rng.uniform(left, right - side)
    y = PAD + rng.uniform(top, bottom - side)
    angle = rng.uniform(-10, 10)
    # rotate a larger patch about the crop's centre, then cut the crop's square from its middle
    margin = side * 0.25
    patch = photo.crop((round(x - margin), round(y - margin), round(x + side + margin), round(y + side + margin)))
    patch = patch.rotate(angle, resample=Image.BILINEAR)
    inner = round(margin)
    patch = patch.crop((inner, inner, patch.width - inner, patch.height - inner))
    if rng.uniform() < 0.5:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    image = np.asarray(patch.resize((size, size), Image.BOX), dtype=np.float32)
    image = image * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8)
    return np.clip(image, 0, 255).round().astype(np.uint8)


# (scan, class name, box (left, top, right, bottom) in the scan's pixels)
SCAN_REGIONS: tuple[tuple[str, str, tuple[int, int, int, int]], ...] = (
    ("mri", "cortex folds", (48, 50, 160, 110)),
    ("mri", "cerebellum", (138, 112, 182, 152)),
    ("mri", "cheek", (32, 150, 82, 215)),
    ("mri", "neck and spine", (110, 165, 165, 235)),
    ("mri", "crown of the head", (70, 18, 170, 58)),
    ("mri", "eye and sinus", (40, 105, 95, 150)),
    ("terrain", "steep ridges", (0, 130, 130, 260)),
    ("terrain", "fault ridge", (230, 40, 400, 110)),
    ("terrain", "gentle hills", (270, 150, 403, 300)),
    ("terrain", "southern slopes", (130, 250, 260, 344)),
)


@functools.cache
def scans() -> dict[str, np.ndarray]:
    """matplotlib's MRI slice and hill-shaded terrain, uint8 H×W (grey)."""
    with matplotlib.cbook.get_sample_data("s1045.ima.gz") as file:
        mri = np.frombuffer(file.read(), np.uint16).reshape(256, 256).astype(np.float64)
    elevation = matplotlib.cbook.get_sample_data("jacksboro_fault_dem.npz")["elevation"]
    shade = matplotlib.colors.LightSource(azdeg=315, altdeg=45).hillshade(elevation, vert_exag=1, dx=10, dy=10)
    return {"mri": np.round(255 * mri / mri.max()).astype(np.uint8),
            "terrain": np.round(255 * shade).astype(np.uint8)}


def generate_scan_patches(per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size] (grey), labels, class names '<scan>: <region>'."""
    rng = np.random.default_rng(seed)
    pictures = {name: _padded(array) for name, array in scans().items()}
    images, names = [], []
    for scan, region, box in SCAN_REGIONS:
        names.append(f"{scan}: {region}")
        images.extend(_photo_crop(pictures[scan], box, rng, size) for _ in range(per_class))
    return np.stack(images), np.repeat(np.arange(len(names)), per_class), names


def generate_photo_patches(per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size, 3], labels, class names '<photo>: <region>'."""
    rng = np.random.default_rng(seed)
    pictures = {name: _padded(array) for name, array in photos().items()}
    images, names = [], []
    for photo, region, box in PHOTO_REGIONS:
        names.append(f"{photo}: {region}")
        images.extend(_photo_crop(pictures[photo], box, rng, size) for _ in range(per_class))
    return np.stack(images), np.repeat(np.arange(len(names)), per_class), names


# ---------------------------------------------------------------- the far-OOD validation source

# (class name, box (left, top, right, bottom) in the relief map's pixels, RELIEF_SCALE × the grid)
RELIEF_REGIONS: tuple[tuple[str, tuple[int, int, int, int]], ...] = (
    ("deep basin", (0, 0, 64, 64)),
    ("northern shore", (160, 0, 330, 52)),
    ("island ridges", (180, 80, 285, 165)),
    ("open strait", (60, 100, 170, 175)),
    ("eastern open water", (330, 60, 460, 140)),
    ("diagonal channel", (200, 200, 330, 262)),
    ("western hills", (0, 180, 120, 280)),
    ("eastern ranges", (400, 180, 480, 300)),
    ("southern peaks", (240, 290, 400, 364)),
    ("south-western valleys", (0, 290, 120, 364)),
)
RELIEF_SCALE = 4


@functools.cache
def relief_map() -> np.ndarray:
    """matplotlib's ``topobathy.npz`` (measured topography and bathymetry of a coast, 91 × 120), coloured by
    height (sea blue, land green to white) and shaded by matplotlib's ``LightSource``, enlarged RELIEF_SCALE×:
    uint8 H×W×3."""
    height = matplotlib.cbook.get_sample_data("topobathy.npz")["topo"].astype(np.float64)
    # 'terrain' is blue below 0.2 and land colours above: the sea floor (to −1500 m) gets [0, 0.2], land [0.2, 1]
    level = np.where(height < 0, 0.2 * (1 + np.maximum(height, -1500) / 1500), 0.2 + 0.8 * np.minimum(height, 2300)
                     / 2300)
    colours = matplotlib.colormaps["terrain"](level)[..., :3]
    shaded = matplotlib.colors.LightSource(azdeg=315, altdeg=45).shade_rgb(
        colours, height, blend_mode="overlay", vert_exag=0.05, dx=100, dy=100)
    picture = Image.fromarray(np.round(255 * shaded[..., :3]).astype(np.uint8))
    return np.asarray(picture.resize((RELIEF_SCALE * height.shape[1], RELIEF_SCALE * height.shape[0]),
                                     Image.BICUBIC))


def generate_relief_patches(per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size, 3], labels, class names 'relief: <region>'.

    The far-OOD *validation* source: settings may be chosen on it, so it is never a test domain. It is real
    measured data (a coastline's terrain and sea floor) in a colour-relief rendering, a source and a renderer
    that neither a training domain nor a far-OOD test domain uses (``scan_patches``' terrain is another place,
    hill-shaded in grey)."""
    rng = np.random.default_rng(seed)
    picture = _padded(relief_map())
    images, names = [], []
    for region, box in RELIEF_REGIONS:
        names.append(f"relief: {region}")
        images.extend(_photo_crop(picture, box, rng, size) for _ in range(per_class))
    return np.stack(images), np.repeat(np.arange(len(names)), per_class), names


# ---------------------------------------------------------------- typefaces never used in training

# Digits and ASCII signs whose glyph is the same sign in every font below (Computer Modern's OT1 encoding puts
# other glyphs at < > " \ { } | _ ^ and, in the italic, at $), each at least twice the glyph domains' look-alike
# distance from every training character (so not / ! [ ], which look like ∕, Tifinagh ⵑ, ⌈ and ⌉).
CHARACTERS = "0123456789#%&?@+=()*"
CM_FONTS = ("cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmti10.ttf", "cmb10.ttf")
PIL_FONTS = ("Aileron (Pillow's default)", "Pillow's bitmap default")

# What each far-OOD renderer does, beside what the training renderers do (tests compare them).
RENDERERS = {
    "cm_outline": {"fonts": CM_FONTS, "stroke": "hollow outline", "polarity": "colour on colour gradient",
                   "resolution": CANVAS, "colour": True},
    "lowres_inverted": {"fonts": PIL_FONTS, "stroke": "filled", "polarity": "light on dark", "resolution": 16,
                        "colour": True},
}


def font_path(font_file: str) -> str:
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font_file)


@functools.cache
def _cm_font(font_file: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(font_file), size)


@functools.cache
def _pil_font(index: int, size: int):
    if index == 0:
        return ImageFont.load_default(size)  # Aileron, embedded in Pillow (FreeType)
    return ImageFont.load_default_imagefont()  # Pillow's bitmap font


def _gradient(first, second, rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear gradient between two colours at a random angle, float [size, size, 3]."""
    axis = np.linspace(-1, 1, size)
    x, y = np.meshgrid(axis, axis)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(0.5 + 0.5 * (x * np.cos(angle) + y * np.sin(angle)) / np.sqrt(2), 0, 1)[..., None]
    return (1 - t) * np.asarray(first, dtype=np.float64) + t * np.asarray(second, dtype=np.float64)


def _luma(colour) -> float:
    return float(np.asarray(colour, dtype=np.float64) @ [0.299, 0.587, 0.114])


def _outline_colours(rng: np.random.Generator):
    """Ink and two background colours, the ink at least 80 grey levels from both."""
    while True:
        ink, first, second = rng.integers(0, 256, size=(3, 3))
        if min(abs(_luma(ink) - _luma(first)), abs(_luma(ink) - _luma(second))) > 80:
            return ink, first, second


def outline_mask(character: str, font_file: str, font_size: int, stroke: int, centre=(CANVAS / 2, CANVAS / 2),
                 hollow: bool = True) -> Image.Image:
    """CANVAS² mask of ``character``: its outline only (a stroke of ``stroke`` px, no fill), or filled."""
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    # fill 0 over a white stroke: only the outline of every stroke is drawn
    ImageDraw.Draw(mask).text(tuple(centre), character, fill=0 if hollow else 255, font=_cm_font(font_file, font_size),
                              anchor="mm", stroke_width=stroke, stroke_fill=255)
    return mask


def _outline_glyph(character: str, rng: np.random.Generator, size: int) -> np.ndarray:
    font_file, font_size = CM_FONTS[int(rng.integers(len(CM_FONTS)))], int(rng.integers(34, 44))
    centre = CANVAS / 2 + rng.uniform(-4, 4, size=2)
    mask = outline_mask(character, font_file, font_size, int(rng.integers(1, 3)), centre)
    mask = mask.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR)
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255
    ink, first, second = _outline_colours(rng)
    image = alpha * ink + (1 - alpha) * _gradient(first, second, rng, CANVAS)
    picture = Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8))
    return np.asarray(picture.resize((size, size), Image.BOX))


def _lowres_glyph(character: str, rng: np.random.Generator, size: int) -> np.ndarray:
    small = int(rng.integers(12, 17))
    font_index = int(rng.integers(len(PIL_FONTS)))
    mask = Image.new("L", (small, small), 0)
    font = _pil_font(font_index, small - 2)
    offset = rng.integers(-1, 2, size=2)
    if font_index == 0:
        ImageDraw.Draw(mask).text((small / 2 + offset[0], small / 2 + offset[1]), character, fill=255, font=font,
                                  anchor="mm")
    else:  # the bitmap font has no anchors: centre its box by hand
        box = ImageDraw.Draw(mask).textbbox((0, 0), character, font=font)
        position = ((small - (box[2] + box[0])) / 2 + offset[0], (small - (box[3] + box[1])) / 2 + offset[1])
        ImageDraw.Draw(mask).text(position, character, fill=255, font=font)
    resample = Image.NEAREST if rng.uniform() < 0.5 else Image.BILINEAR
    mask = mask.resize((size, size), resample)
    if rng.uniform() < 0.5:
        mask = mask.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2)))
    alpha = np.asarray(mask, dtype=np.float64)[..., None] / 255
    ink = rng.integers(170, 256, size=3)
    dark = rng.integers(0, 70, size=(2, 3))
    image = alpha * ink + (1 - alpha) * _gradient(dark[0], dark[1], rng, size)
    image = image + rng.normal(0, rng.uniform(8, 20), size=image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def class_names() -> list[str]:
    return [f"U+{ord(c):04X} {unicodedata.name(c).lower()}" for c in CHARACTERS]


def _generate_glyphs(render, per_class: int, size: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [render(character, rng, size) for character in CHARACTERS for _ in range(per_class)]
    return np.stack(images), np.repeat(np.arange(len(CHARACTERS)), per_class), class_names()


def generate_cm_outline(per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size, 3], labels, class names (one per character of CHARACTERS)."""
    return _generate_glyphs(_outline_glyph, per_class, size, seed)


def generate_lowres_inverted(per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size, 3], labels, class names (one per character of CHARACTERS)."""
    return _generate_glyphs(_lowres_glyph, per_class, size, seed)
