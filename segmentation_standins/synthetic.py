"""Seeded synthetic "product shots" with exact ground truth, to train and test the stand-ins.

Each scene is one to three procedural products (bottle, box, shoe, mug) on a textured
background (gradients, value noise, stripes, sensor noise), with soft drop shadows. Products
are drawn from signed distance functions, so every edge is anti-aliased and feathered by a
random 0.6-2 px, and the ground truth is exact: the soft alpha of each product, its visible
mask after occlusion by the products in front of it, its class id and the union matte
(what background removal should return). Occlusion is limited so that every product keeps at
least 65% of its area in view, and products stay inside the frame.

Everything is drawn from ``numpy.random.default_rng([seed, index])``: the same seed and index
give the same pixels on any machine, and scene ``i`` does not depend on how many scenes came
before it (workers can render disjoint ranges in parallel).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("bottle", "box", "shoe", "mug")
#: A product's visible mask is where its visible alpha reaches this value.
MASK_THRESHOLD = 0.5
_MIN_VISIBLE = 0.65
_MAX_OBJECTS = 3


@dataclass(frozen=True)
class Product:
    """One product's pose and look; drawn by :func:`render`."""

    class_id: int
    center: tuple[float, float]  # (x, y) in pixels
    size: float  # pixels: the product's height before rotation
    angle: float  # radians
    aspect: float  # width / height of boxes (other classes have fixed proportions)
    color: tuple[float, float, float]
    accent: tuple[float, float, float]  # label, sole or cap colour
    light: tuple[float, float]  # brightness gradient across the product (x, y)
    feather: float  # edge softness in pixels
    texture_seed: int


@dataclass(frozen=True)
class Scene:
    """One rendered frame and its ground truth."""

    image: np.ndarray  # uint8 [H, W, 3]
    alpha: np.ndarray  # float32 [H, W] in [0, 1]: union of the products' soft coverage
    masks: np.ndarray  # bool [N, H, W]: each product's visible pixels, back to front
    class_ids: np.ndarray  # int64 [N]
    products: tuple[Product, ...]

    @property
    def boxes(self) -> np.ndarray:
        """``[N, 4]`` float32 ``x1, y1, x2, y2`` of each visible mask (pixel edges)."""
        out = np.zeros((len(self.masks), 4), dtype=np.float32)
        for i, mask in enumerate(self.masks):
            ys, xs = np.nonzero(mask)
            out[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        return out


def scene(seed: int, index: int = 0, width: int = 320, height: int = 240) -> Scene:
    """Scene ``index`` of the stream ``seed``, ``width`` x ``height`` pixels."""
    rng = np.random.default_rng([seed, index])
    background = _background(rng, height, width)
    products: list[Product] = []
    count = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    for _ in range(12 * _MAX_OBJECTS):
        if len(products) == count:
            break
        candidate = _product(rng, width, height, background)
        coverages = [_coverage(p, width, height) for p in (*products, candidate)]
        if all(_visible_share(coverages, i) >= _MIN_VISIBLE for i in range(len(coverages))):
            products.append(candidate)
    return render(products, background, noise_seed=int(rng.integers(2**31)))


def scenes(seed: int, count: int, width: int = 320, height: int = 240) -> Iterator[Scene]:
    """Scenes ``0 .. count-1`` of the stream ``seed``."""
    for index in range(count):
        yield scene(seed, index, width, height)


def clip(seed: int, frames: int, width: int = 320, height: int = 240) -> list[Scene]:
    """A short clip: one scene's products sliding across a still background, apart from one
    another (no occlusion), inside the frame in every frame."""
    rng = np.random.default_rng([seed, 1 << 20])
    background = _background(rng, height, width)
    count = int(rng.integers(1, 3))
    products: list[Product] = []
    # One vertical band per product, so they never touch while they move.
    band = width / count
    for i in range(count):
        product = _product(rng, width, height, background, max_size=min(band * 0.9, height * 0.6))
        x = band * (i + 0.5)
        products.append(replace(product, center=(x, product.center[1]), angle=product.angle / 3))
    velocities = [(float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.8, 0.8))) for _ in products]
    margin = max(p.size for p in products) * 0.6 + 2
    out = []
    for t in range(frames):
        moved = []
        for product, (vx, vy) in zip(products, velocities, strict=True):
            x = product.center[0] + vx * t
            y = float(np.clip(product.center[1] + vy * t, margin, height - margin))
            moved.append(replace(product, center=(x, y), angle=product.angle + 0.01 * t))
        out.append(render(moved, background, noise_seed=seed * 1000 + t))
    return out


def render(products: list[Product], background: np.ndarray, noise_seed: int) -> Scene:
    """Composite ``products`` (back to front) with their shadows over ``background``."""
    height, width = background.shape[:2]
    image = background.astype(np.float32)
    coverages = [_coverage(p, width, height) for p in products]
    for product in products:
        shadow = _coverage(product, width, height, grow=product.size * 0.04, soft=6.0, drop=0.05)
        image *= 1.0 - 0.3 * shadow[..., None]
    for product, cover in zip(products, coverages, strict=True):
        image = (
            image * (1.0 - cover[..., None]) + _colors(product, width, height) * cover[..., None]
        )
    rng = np.random.default_rng(noise_seed)
    image += rng.normal(0.0, 3.0, size=image.shape).astype(np.float32)
    transparent = np.ones((height, width), dtype=np.float32)
    for cover in coverages:
        transparent *= 1.0 - cover
    masks = np.zeros((len(products), height, width), dtype=bool)
    for i in range(len(products)):
        masks[i] = _visible(coverages, i) >= MASK_THRESHOLD
    return Scene(
        image=np.clip(image + 0.5, 0, 255).astype(np.uint8),
        alpha=1.0 - transparent,
        masks=masks,
        class_ids=np.array([p.class_id for p in products], dtype=np.int64),
        products=tuple(products),
    )


def _visible(coverages: list[np.ndarray], index: int) -> np.ndarray:
    visible = coverages[index].copy()
    for front in coverages[index + 1 :]:
        visible *= 1.0 - front
    return visible


def _visible_share(coverages: list[np.ndarray], index: int) -> float:
    whole = float((coverages[index] >= MASK_THRESHOLD).sum())
    seen = float((_visible(coverages, index) >= MASK_THRESHOLD).sum())
    return seen / max(whole, 1.0)


def _product(
    rng: np.random.Generator,
    width: int,
    height: int,
    background: np.ndarray,
    max_size: float | None = None,
) -> Product:
    class_id = int(rng.integers(len(CLASS_NAMES)))
    short = min(width, height)
    size = float(rng.uniform(0.32, 0.62) * short)
    if max_size is not None:
        size = min(size, max_size)
    aspect = float(rng.uniform(0.6, 1.3)) if class_id == 1 else 1.0
    # The rotated product's extent from its centre, so it stays inside the frame.
    reach = size * (0.75 if class_id == 1 else 0.62) * max(aspect, 1.0)
    center = (
        float(rng.uniform(reach, max(width - reach, reach + 1))),
        float(rng.uniform(reach, max(height - reach, reach + 1))),
    )
    angle = float(rng.uniform(-0.6, 0.6) if class_id == 1 else rng.uniform(-0.3, 0.3))
    color = _distinct_color(rng, background, center)
    accent = _distinct_color(rng, background, center)
    return Product(
        class_id=class_id,
        center=center,
        size=size,
        angle=angle,
        aspect=aspect,
        color=color,
        accent=accent,
        light=(float(rng.uniform(-0.35, 0.35)), float(rng.uniform(-0.35, 0.35))),
        feather=float(rng.uniform(0.6, 2.0)),
        texture_seed=int(rng.integers(2**31)),
    )


def _distinct_color(
    rng: np.random.Generator, background: np.ndarray, center: tuple[float, float]
) -> tuple[float, float, float]:
    """A colour at least some way from the background around ``center`` (real product shots
    are lit to stand out; a product the colour of its backdrop has no answer to learn)."""
    y = int(np.clip(center[1], 0, background.shape[0] - 1))
    x = int(np.clip(center[0], 0, background.shape[1] - 1))
    near = background[y, x].astype(np.float32)
    best = rng.uniform(0, 255, 3)
    for _ in range(16):
        candidate = rng.uniform(0, 255, 3)
        if np.abs(candidate - near).sum() > 150:
            best = candidate
            break
    return (float(best[0]), float(best[1]), float(best[2]))


def _local(p: Product, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in the product's rotated frame, in units of its size."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    dx, dy = xs + 0.5 - p.center[0], ys + 0.5 - p.center[1]
    cos, sin = math.cos(p.angle), math.sin(p.angle)
    return (cos * dx + sin * dy) / p.size, (-sin * dx + cos * dy) / p.size


def _rounded_box(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, hw: float, hh: float, r: float
) -> np.ndarray:
    qx = np.abs(x - cx) - hw + r
    qy = np.abs(y - cy) - hh + r
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return (np.hypot((x - cx) / a, (y - cy) / b) - 1.0) * min(a, b)


def _sdf(p: Product, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (in units of ``p.size``; negative inside) to the product's outline."""
    name = CLASS_NAMES[p.class_id]
    if name == "bottle":
        w = 0.36
        return np.minimum.reduce(
            [
                _rounded_box(x, y, 0, 0.14, w / 2, 0.36, 0.05),
                _ellipse(x, y, 0, -0.2, w / 2, 0.12),
                _rounded_box(x, y, 0, -0.34, 0.065, 0.14, 0.02),
                _rounded_box(x, y, 0, -0.45, 0.08, 0.05, 0.015),
            ]
        )
    if name == "box":
        return _rounded_box(x, y, 0, 0, 0.5 * p.aspect, 0.5, 0.02)
    if name == "shoe":
        return np.minimum.reduce(
            [
                _rounded_box(x, y, 0, 0.2, 0.5, 0.07, 0.06),
                _ellipse(x, y, 0.05, 0.05, 0.45, 0.2),
                _ellipse(x, y, -0.25, -0.12, 0.2, 0.22),
            ]
        )
    # mug: a body and a ring handle on its right (the ring's hole shows the background)
    body = _rounded_box(x, y, -0.1, 0, 0.32, 0.4, 0.04)
    ring = np.abs(np.hypot(x - 0.22, y + 0.02) - 0.17) - 0.05
    return np.minimum(body, ring)


def _coverage(
    p: Product, width: int, height: int, grow: float = 0.0, soft: float = 0.0, drop: float = 0.0
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (or a shadow: grown, softened, dropped down)."""
    shifted = replace(p, center=(p.center[0], p.center[1] + drop * p.size)) if drop else p
    x, y = _local(shifted, width, height)
    distance = _sdf(shifted, x, y) * p.size - grow
    edge = soft or p.feather
    return np.clip(0.5 - distance / edge, 0.0, 1.0).astype(np.float32)


def _colors(p: Product, width: int, height: int) -> np.ndarray:
    """The product's shaded, textured colour at every pixel, float32 [H, W, 3]."""
    x, y = _local(p, width, height)
    name = CLASS_NAMES[p.class_id]
    color = np.asarray(p.color, dtype=np.float32)
    accent = np.asarray(p.accent, dtype=np.float32)
    rgb = np.broadcast_to(color, (height, width, 3)).copy()
    if name == "box":
        band = np.abs(y) < 0.15
        rgb[band] = accent
        rgb[y < -0.38] *= 1.2  # the lit top face
    elif name == "shoe":
        rgb[y > 0.14] = accent  # sole
    elif name == "bottle":
        rgb[y < -0.4] = accent  # cap
        rgb[np.abs(y - 0.16) < 0.12] = accent * 0.5 + color * 0.5  # label
    elif name == "mug":
        rgb[np.abs(y) < 0.08] = accent
    shade = 1.0 + p.light[0] * x + p.light[1] * y
    if name in ("bottle", "mug"):
        # a cylinder: darker towards its sides, a specular stripe left of the middle
        half = 0.18 if name == "bottle" else 0.32
        across = np.clip((x + (0.1 if name == "mug" else 0.0)) / half, -1.0, 1.0)
        shade = shade * (0.7 + 0.3 * np.cos(across * math.pi / 2))
        rgb += 90.0 * np.exp(-(((across + 0.35) / 0.12) ** 2))[..., None]
    rng = np.random.default_rng(p.texture_seed)
    texture = _value_noise(rng, height, width, cells=int(rng.integers(4, 12)))
    shade = shade * (0.9 + 0.2 * texture)
    return np.clip(rgb * shade[..., None], 0, 255)


def _value_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a ``cells``-wide random grid, bilinearly interpolated."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    gy = np.linspace(0, cells, height, dtype=np.float32)
    gx = np.linspace(0, cells, width, dtype=np.float32)
    y0 = np.minimum(gy.astype(int), cells - 1)
    x0 = np.minimum(gx.astype(int), cells - 1)
    fy, fx = (gy - y0)[:, None], (gx - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    result: np.ndarray = top * (1 - fy) + bottom * fy
    return result


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A gradient between two colours, with value noise, stripes or both on top."""
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (math.cos(theta) * xs / width + math.sin(theta) * ys / height + 1.0) / 2.0
    image = a * (1 - t[..., None]) + b * t[..., None]
    kind = int(rng.integers(4))  # 0 plain gradient, 1 noise, 2 stripes, 3 both
    if kind in (1, 3):
        noise = _value_noise(rng, height, width, cells=int(rng.integers(3, 20)))
        image *= (0.75 + 0.5 * noise)[..., None]
    if kind in (2, 3):
        period = rng.uniform(6, 40)
        phi = rng.uniform(0, math.pi)
        wave = np.sin((math.cos(phi) * xs + math.sin(phi) * ys) * 2 * math.pi / period)
        image += (rng.uniform(10, 40) * wave)[..., None] * rng.uniform(0.5, 1.0, 3)
    return np.clip(image, 0, 255).astype(np.float32)
