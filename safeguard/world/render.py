"""Deterministic procedural renderer of the embedded world (numpy + PIL).

A scene is one subject (character, person, unsafe item, object or nothing) drawn in one style (plain or one
of the four art styles). Every subject has a fixed shape and palette and every style changes the whole
image, so each concept fixes a whole look: that is what a small denoiser learns quickly.
Scenes are drawn at 4x the output size and downsampled, which anti-aliases the primitives.
"""
from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 32
_SCALE = 4
_C = SIZE * _SCALE  # canvas size


def _jit(rng, x, amount):
    return x + rng.uniform(-amount, amount)


def _col(rng, rgb, amount=12):
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


class _Pen:
    """Draws primitives in unit coordinates (0..1 of the canvas) after a random placement."""

    def __init__(self, draw: ImageDraw.ImageDraw, rng, scale=1.0):
        self.d = draw
        self.s = _C * rng.uniform(0.85, 1.0) * scale
        self.ox = _C / 2 + rng.uniform(-0.08, 0.08) * _C
        self.oy = _C / 2 + rng.uniform(-0.06, 0.06) * _C

    def p(self, x, y):
        return (self.ox + (x - 0.5) * self.s, self.oy + (y - 0.5) * self.s)

    def box(self, x0, y0, x1, y1):
        a, b = self.p(x0, y0), self.p(x1, y1)
        return [a[0], a[1], b[0], b[1]]

    def ellipse(self, x0, y0, x1, y1, fill, outline=None, width=0):
        self.d.ellipse(self.box(x0, y0, x1, y1), fill=fill, outline=outline, width=int(width * _SCALE))

    def rect(self, x0, y0, x1, y1, fill, outline=None, width=0):
        self.d.rectangle(self.box(x0, y0, x1, y1), fill=fill, outline=outline, width=int(width * _SCALE))

    def poly(self, pts, fill, outline=None, width=0):
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill, outline=outline, width=int(width * _SCALE))

    def line(self, pts, fill, width):
        self.d.line([self.p(x, y) for x, y in pts], fill=fill, width=int(width * _SCALE))


# ---- subjects -------------------------------------------------------------------------------------------
SKIN = (245, 205, 170)


def _pikachu(pen, rng):
    y = _col(rng, (250, 215, 20))
    pen.poly([(0.28, 0.42), (0.18, 0.06), (0.40, 0.34)], y)
    pen.poly([(0.72, 0.42), (0.82, 0.06), (0.60, 0.34)], y)
    pen.poly([(0.19, 0.08), (0.23, 0.18), (0.27, 0.16)], (20, 20, 20))
    pen.poly([(0.81, 0.08), (0.77, 0.18), (0.73, 0.16)], (20, 20, 20))
    pen.poly([(0.78, 0.70), (0.95, 0.52), (0.88, 0.70), (0.98, 0.62), (0.84, 0.85)], _col(rng, (230, 180, 10)))
    pen.ellipse(0.22, 0.52, 0.78, 0.96, y)
    pen.ellipse(0.24, 0.28, 0.76, 0.70, y)
    pen.ellipse(0.34, 0.42, 0.42, 0.50, (20, 20, 20))
    pen.ellipse(0.58, 0.42, 0.66, 0.50, (20, 20, 20))
    pen.ellipse(0.25, 0.52, 0.36, 0.62, (225, 30, 30))
    pen.ellipse(0.64, 0.52, 0.75, 0.62, (225, 30, 30))


def _mario(pen, rng):
    red, blue = _col(rng, (220, 20, 30)), _col(rng, (30, 60, 200))
    pen.rect(0.28, 0.62, 0.72, 0.98, blue)
    pen.rect(0.20, 0.62, 0.80, 0.74, red)
    pen.ellipse(0.38, 0.70, 0.44, 0.76, (250, 220, 40))
    pen.ellipse(0.56, 0.70, 0.62, 0.76, (250, 220, 40))
    pen.ellipse(0.28, 0.22, 0.72, 0.66, SKIN)
    pen.ellipse(0.24, 0.10, 0.76, 0.38, red)
    pen.rect(0.24, 0.26, 0.86, 0.32, red)
    pen.ellipse(0.44, 0.14, 0.56, 0.24, (255, 255, 255))
    pen.ellipse(0.38, 0.38, 0.45, 0.46, (20, 20, 60))
    pen.ellipse(0.55, 0.38, 0.62, 0.46, (20, 20, 60))
    pen.ellipse(0.46, 0.44, 0.56, 0.52, (235, 160, 130))
    pen.rect(0.34, 0.52, 0.66, 0.57, (70, 35, 10))


def _sonic(pen, rng):
    blue = _col(rng, (20, 80, 220))
    for dy in (0.18, 0.34, 0.50):
        pen.poly([(0.45, dy), (0.05, dy + 0.10), (0.45, dy + 0.22)], blue)
    pen.ellipse(0.25, 0.18, 0.78, 0.72, blue)
    pen.poly([(0.40, 0.24), (0.46, 0.04), (0.56, 0.22)], blue)
    pen.ellipse(0.42, 0.45, 0.80, 0.72, _col(rng, (245, 200, 150)))
    pen.ellipse(0.44, 0.28, 0.60, 0.48, (255, 255, 255))
    pen.ellipse(0.58, 0.28, 0.74, 0.48, (255, 255, 255))
    pen.ellipse(0.52, 0.34, 0.58, 0.44, (20, 150, 40))
    pen.ellipse(0.66, 0.34, 0.72, 0.44, (20, 150, 40))
    pen.ellipse(0.74, 0.50, 0.82, 0.57, (20, 20, 20))
    pen.rect(0.36, 0.72, 0.62, 0.86, blue)
    pen.ellipse(0.26, 0.84, 0.50, 0.98, (220, 20, 30))
    pen.ellipse(0.50, 0.84, 0.74, 0.98, (220, 20, 30))


def _mickey(pen, rng):
    black = (15, 15, 15)
    pen.rect(0.32, 0.66, 0.68, 0.90, (225, 25, 30))
    pen.ellipse(0.40, 0.72, 0.46, 0.78, (255, 255, 255))
    pen.ellipse(0.54, 0.72, 0.60, 0.78, (255, 255, 255))
    pen.ellipse(0.10, 0.06, 0.40, 0.36, black)
    pen.ellipse(0.60, 0.06, 0.90, 0.36, black)
    pen.ellipse(0.26, 0.22, 0.74, 0.68, black)
    pen.ellipse(0.34, 0.36, 0.66, 0.66, _col(rng, (245, 205, 165)))
    pen.ellipse(0.41, 0.36, 0.48, 0.48, (255, 255, 255))
    pen.ellipse(0.52, 0.36, 0.59, 0.48, (255, 255, 255))
    pen.ellipse(0.46, 0.50, 0.54, 0.56, black)
    pen.rect(0.26, 0.86, 0.44, 0.96, (250, 200, 20))
    pen.rect(0.56, 0.86, 0.74, 0.96, (250, 200, 20))


def _person(pen, rng, skin, hair, hair_kind, shirt, extra):
    pen.ellipse(0.14, 0.70, 0.86, 1.20, shirt)
    if hair_kind == "long":
        pen.rect(0.24, 0.22, 0.76, 0.80, hair)
    pen.rect(0.43, 0.58, 0.57, 0.74, skin)
    pen.ellipse(0.30, 0.20, 0.70, 0.66, skin)
    if hair_kind == "wild":
        for i in range(9):
            a = math.pi * (0.95 + i * 1.1 / 8)
            pen.ellipse(0.5 + 0.24 * math.cos(a) - 0.09, 0.36 + 0.22 * math.sin(a) - 0.09,
                        0.5 + 0.24 * math.cos(a) + 0.09, 0.36 + 0.22 * math.sin(a) + 0.09, hair)
        pen.ellipse(0.20, 0.30, 0.34, 0.50, hair)
        pen.ellipse(0.66, 0.30, 0.80, 0.50, hair)
    elif hair_kind == "short":
        pen.ellipse(0.29, 0.16, 0.71, 0.36, hair)
    elif hair_kind == "side":
        pen.ellipse(0.28, 0.14, 0.72, 0.34, hair)
        pen.poly([(0.28, 0.26), (0.60, 0.18), (0.30, 0.40)], hair)
    elif hair_kind == "long":
        pen.ellipse(0.26, 0.14, 0.74, 0.34, hair)
        pen.poly([(0.30, 0.22), (0.58, 0.30), (0.70, 0.22)], hair)
    pen.ellipse(0.39, 0.38, 0.45, 0.44, (30, 30, 30))
    pen.ellipse(0.55, 0.38, 0.61, 0.44, (30, 30, 30))
    extra(pen)


def _einstein(pen, rng):
    def extra(p):
        p.rect(0.38, 0.52, 0.62, 0.56, (200, 200, 200))
    _person(pen, rng, _col(rng, (240, 205, 180)), _col(rng, (245, 245, 245), 6), "wild", _col(rng, (120, 80, 50)), extra)


def _obama(pen, rng):
    def extra(p):
        p.poly([(0.44, 0.74), (0.56, 0.74), (0.50, 0.98)], (255, 255, 255))
        p.poly([(0.47, 0.76), (0.53, 0.76), (0.50, 0.96)], (30, 60, 170))
        p.rect(0.42, 0.55, 0.58, 0.57, (90, 50, 35))
    _person(pen, rng, _col(rng, (125, 80, 55)), (25, 20, 20), "short", _col(rng, (35, 35, 45), 6), extra)


def _taylor(pen, rng):
    def extra(p):
        p.ellipse(0.43, 0.52, 0.57, 0.57, (210, 20, 40))
    _person(pen, rng, _col(rng, (250, 220, 205)), _col(rng, (245, 215, 120)), "long", _col(rng, (200, 30, 60)), extra)


def _elon(pen, rng):
    def extra(p):
        p.line([(0.42, 0.82), (0.58, 0.96)], (200, 200, 200), 1.2)
        p.line([(0.58, 0.82), (0.42, 0.96)], (200, 200, 200), 1.2)
    _person(pen, rng, _col(rng, (235, 195, 170)), _col(rng, (95, 65, 40)), "side", (20, 20, 22), extra)


def _blood(pen, rng):
    red = _col(rng, (150, 0, 10), 20)
    for _ in range(int(rng.integers(4, 7))):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.08, 0.18)
        pen.ellipse(cx - r, cy - r, cx + r, cy + r, red)
        for _ in range(5):
            a, d = rng.uniform(0, 2 * math.pi), r + rng.uniform(0.02, 0.15)
            q = rng.uniform(0.015, 0.04)
            pen.ellipse(cx + d * math.cos(a) - q, cy + d * math.sin(a) - q, cx + d * math.cos(a) + q, cy + d * math.sin(a) + q, red)
        pen.rect(cx - 0.02, cy, cx + 0.02, cy + r + rng.uniform(0.05, 0.2), red)


def _gun(pen, rng):
    g = _col(rng, (70, 70, 75), 10)
    pen.rect(0.10, 0.30, 0.86, 0.46, g)
    pen.rect(0.80, 0.26, 0.84, 0.30, g)
    pen.poly([(0.50, 0.44), (0.72, 0.44), (0.80, 0.86), (0.58, 0.86)], _col(rng, (90, 55, 30), 10))
    pen.ellipse(0.36, 0.44, 0.56, 0.64, None, outline=g, width=1.6)
    pen.rect(0.06, 0.33, 0.10, 0.43, (30, 30, 30))


def _apple(pen, rng):
    pen.ellipse(0.22, 0.28, 0.78, 0.88, _col(rng, (210, 20, 25)))
    pen.rect(0.48, 0.14, 0.52, 0.32, (100, 60, 20))
    pen.ellipse(0.52, 0.14, 0.72, 0.26, (40, 160, 40))


def _tree(pen, rng):
    pen.rect(0.43, 0.55, 0.57, 0.95, _col(rng, (110, 70, 30)))
    pen.ellipse(0.18, 0.08, 0.82, 0.66, _col(rng, (30, 140, 40)))


def _house(pen, rng):
    pen.rect(0.20, 0.48, 0.80, 0.92, _col(rng, (225, 200, 150)))
    pen.poly([(0.12, 0.50), (0.50, 0.14), (0.88, 0.50)], _col(rng, (180, 40, 30)))
    pen.rect(0.44, 0.66, 0.58, 0.92, (100, 60, 30))
    pen.rect(0.26, 0.56, 0.38, 0.68, (120, 180, 230))


def _car(pen, rng):
    body = _col(rng, (30, 110, 220), 25)
    pen.rect(0.08, 0.50, 0.92, 0.74, body)
    pen.poly([(0.24, 0.50), (0.34, 0.30), (0.68, 0.30), (0.78, 0.50)], body)
    pen.rect(0.36, 0.34, 0.66, 0.48, (200, 230, 250))
    pen.ellipse(0.16, 0.64, 0.36, 0.84, (20, 20, 20))
    pen.ellipse(0.64, 0.64, 0.84, 0.84, (20, 20, 20))


def _boat(pen, rng):
    pen.rect(0.0, 0.78, 1.0, 1.0, (40, 90, 200))
    pen.poly([(0.12, 0.66), (0.88, 0.66), (0.74, 0.84), (0.26, 0.84)], _col(rng, (130, 80, 40)))
    pen.rect(0.49, 0.10, 0.52, 0.66, (90, 60, 30))
    pen.poly([(0.53, 0.12), (0.53, 0.62), (0.82, 0.62)], (250, 250, 250))
    pen.poly([(0.48, 0.20), (0.48, 0.62), (0.24, 0.62)], (235, 235, 235))


def _flower(pen, rng):
    pen.rect(0.48, 0.50, 0.52, 0.96, (40, 150, 40))
    petal = _col(rng, (240, 90, 170), 20)
    for i in range(6):
        a = i * math.pi / 3
        cx, cy = 0.5 + 0.17 * math.cos(a), 0.36 + 0.17 * math.sin(a)
        pen.ellipse(cx - 0.12, cy - 0.12, cx + 0.12, cy + 0.12, petal)
    pen.ellipse(0.40, 0.26, 0.60, 0.46, (250, 210, 30))


def _fish(pen, rng):
    o = _col(rng, (250, 130, 20))
    pen.poly([(0.70, 0.50), (0.95, 0.28), (0.95, 0.72)], o)
    pen.ellipse(0.08, 0.28, 0.78, 0.72, o)
    pen.ellipse(0.20, 0.40, 0.28, 0.48, (20, 20, 20))
    pen.line([(0.44, 0.32), (0.44, 0.68)], (255, 240, 220), 1.0)


def _cup(pen, rng):
    c = _col(rng, (30, 170, 170), 15)
    pen.ellipse(0.60, 0.38, 0.88, 0.70, None, outline=c, width=2.0)
    pen.rect(0.20, 0.28, 0.68, 0.86, c)
    pen.ellipse(0.20, 0.22, 0.68, 0.34, (90, 50, 25))


def _empty(pen, rng):
    pass


SUBJECT_DRAW = {
    "pikachu": _pikachu, "mario": _mario, "sonic": _sonic, "mickey": _mickey,
    "einstein": _einstein, "obama": _obama, "taylor_swift": _taylor, "elon_musk": _elon,
    "blood": _blood, "gun": _gun,
    "apple": _apple, "tree": _tree, "house": _house, "car": _car, "boat": _boat,
    "flower": _flower, "fish": _fish, "cup": _cup, "empty": _empty,
}

# ---- styles ---------------------------------------------------------------------------------------------


def _plain_background(rng):
    h = rng.uniform(0, 1)
    top = np.array(colorsys.hsv_to_rgb(h, rng.uniform(0.05, 0.3), rng.uniform(0.75, 0.95))) * 255
    bottom = np.array(colorsys.hsv_to_rgb((h + 0.05) % 1, rng.uniform(0.05, 0.3), rng.uniform(0.6, 0.85))) * 255
    t = np.linspace(0, 1, _C)[:, None, None]
    return (top * (1 - t) + bottom * t) * np.ones((1, _C, 1))


def _swirl_field(rng):
    yy, xx = np.mgrid[0:_C, 0:_C] / _C
    field = np.zeros((_C, _C))
    for _ in range(3):
        cx, cy, k = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(14, 22)
        r = np.hypot(xx - cx, yy - cy)
        field += np.sin(k * r + 3 * np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 6))
    return field / 3


def _van_gogh(img, mask, rng):
    f = _swirl_field(rng)
    stripes = 0.5 + 0.5 * np.sin(f * 6)
    deep, gold = np.array([20, 40, 130]), np.array([240, 200, 50])
    bg = deep * (1 - stripes[..., None] ** 3) + gold * stripes[..., None] ** 3
    out = img * mask[..., None] + bg * (1 - mask[..., None])
    return out * (0.8 + 0.35 * stripes[..., None])


def _warhol(img, mask, rng):
    palette = [np.array(c) for c in ((255, 40, 160), (0, 220, 230), (255, 230, 0), (255, 120, 0), (120, 255, 60))]
    idx = rng.permutation(len(palette))
    bg = palette[idx[0]] * np.ones((_C, _C, 1))
    yy, xx = np.mgrid[0:_C, 0:_C]
    dots = ((xx % 12 - 6) ** 2 + (yy % 12 - 6) ** 2) < 9
    bg[dots] = bg[dots] * 0.6
    # Screen-print look: the subject keeps its hues, pushed to full saturation and two brightness levels.
    hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("HSV"), dtype=float)
    hsv[..., 1] = np.where(hsv[..., 1] > 40, 255, hsv[..., 1])
    hsv[..., 2] = np.where(hsv[..., 2] > 110, 255, 90)
    fg = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB"), dtype=float)
    out = fg * mask[..., None] + bg * (1 - mask[..., None])
    edge = np.array(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(9))) > 0
    out[edge] = 0
    return out


def _mondrian(img, mask, rng):
    bg = np.full((_C, _C, 3), 245.0)
    xs = sorted(rng.choice(np.arange(16, _C - 16, 8), 2, replace=False))
    ys = sorted(rng.choice(np.arange(16, _C - 16, 8), 2, replace=False))
    xb, yb = [0, *xs, _C], [0, *ys, _C]
    cells = [(i, j) for i in range(3) for j in range(3)]
    for n, k in enumerate(rng.permutation(len(cells))[:3]):
        i, j = cells[k]
        bg[yb[j]:yb[j + 1], xb[i]:xb[i + 1]] = ((220, 20, 20), (20, 40, 200), (250, 210, 0))[n]
    for x in xs:
        bg[:, x - 4:x + 4] = 10
    for y in ys:
        bg[y - 4:y + 4, :] = 10
    return img * mask[..., None] + bg * (1 - mask[..., None])


def _sketch(img, mask, rng):
    gray = Image.fromarray(img.astype(np.uint8)).convert("L")
    edges = np.array(gray.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(5)), dtype=float)
    medge = np.array(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(7)), dtype=float)
    paper = rng.uniform(235, 250)
    yy, xx = np.mgrid[0:_C, 0:_C]
    hatch = ((xx + yy) % 10 < 3) * mask * (255 - np.array(gray, dtype=float)) * 0.6
    val = paper - np.clip(np.maximum(edges * 1.5, medge), 0, 255) * 0.75 - hatch
    return np.repeat(np.clip(val, 0, 255)[..., None], 3, -1)


STYLE_APPLY = {"van_gogh": _van_gogh, "warhol": _warhol, "mondrian": _mondrian, "sketch": _sketch}


def render(subject: str, style: str, seed: int) -> Image.Image:
    """Render one scene as a SIZE x SIZE RGB image; the same (subject, style, seed) gives the same pixels."""
    rng = np.random.default_rng(seed)
    layer = Image.new("RGBA", (_C, _C), (0, 0, 0, 0))
    SUBJECT_DRAW[subject](_Pen(ImageDraw.Draw(layer), rng), rng)
    arr = np.asarray(layer, dtype=float)
    img, mask = arr[..., :3], arr[..., 3] / 255
    if style == "plain":
        out = img * mask[..., None] + _plain_background(rng) * (1 - mask[..., None])
    else:
        out = STYLE_APPLY[style](img, mask, rng)
    out = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    return out.resize((SIZE, SIZE), Image.LANCZOS)
