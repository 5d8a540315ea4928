"""The synthetic product shots are reproducible and their ground truth matches their pixels."""

from __future__ import annotations

import numpy as np

from segmentation_standins import synthetic
from segmentation_standins.quality import instance_recall, mask_iou, matte_iou


def test_the_same_seed_and_index_give_identical_scenes() -> None:
    a, b = synthetic.scene(5, 3, 200, 150), synthetic.scene(5, 3, 200, 150)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.alpha, b.alpha)
    assert np.array_equal(a.masks, b.masks) and np.array_equal(a.class_ids, b.class_ids)
    c = synthetic.scene(6, 3, 200, 150)
    assert not np.array_equal(a.image, c.image)
    # scene i does not depend on the scenes before it
    assert np.array_equal(list(synthetic.scenes(5, 4, 200, 150))[3].image, a.image)


def test_ground_truth_is_consistent_with_the_image() -> None:
    for index in range(6):
        scene = synthetic.scene(11, index, 240, 180)
        n = len(scene.class_ids)
        assert 1 <= n <= 3 and scene.masks.shape == (n, 180, 240)
        assert scene.image.dtype == np.uint8 and scene.alpha.dtype == np.float32
        assert set(scene.class_ids.tolist()) <= set(range(len(synthetic.CLASS_NAMES)))
        # visible masks are disjoint and their union is the matte's foreground
        assert scene.masks.sum(0).max() <= 1
        union = scene.masks.any(0)
        assert mask_iou(union, scene.alpha >= 0.5) > 0.99
        # soft edges: fractional alpha along every outline, none far from it
        fractional = (scene.alpha > 0.05) & (scene.alpha < 0.95)
        assert fractional.sum() > 0.5 * np.sqrt(union.sum())
        # no product hidden beyond the occlusion limit, none cut by the frame border
        for mask in scene.masks:
            assert mask.sum() > 200
        assert scene.alpha[[0, -1], :].max() < 0.5 and scene.alpha[:, [0, -1]].max() < 0.5
        # product pixels differ from the background around them
        inside = scene.alpha > 0.99
        assert scene.image[inside].std() > 5


def test_a_clip_moves_products_without_occlusion() -> None:
    frames = synthetic.clip(4, 5, 200, 150)
    assert len(frames) == 5
    assert not np.array_equal(frames[0].alpha, frames[-1].alpha)  # they move
    for frame in frames:
        assert frame.masks.sum(0).max() <= 1
        for mask, product in zip(frame.masks, frame.products, strict=True):
            whole = synthetic._coverage(product, 200, 150) >= 0.5
            assert mask_iou(mask, whole) == 1.0  # nothing hides any part of a product


def test_scores_against_the_ground_truth() -> None:
    scene = synthetic.scene(2, 0, 160, 120)
    perfect = (scene.alpha * 255).round().astype(np.uint8)
    assert matte_iou(perfect, scene) > 0.99
    assert matte_iou(np.zeros_like(perfect), scene) == 0.0
    found = [(int(c), m) for c, m in zip(scene.class_ids, scene.masks, strict=True)]
    assert instance_recall(found, scene) == (len(found), len(found))
    wrong_class = [((c + 1) % 4, m) for c, m in found]
    assert instance_recall(wrong_class, scene) == (0, len(found))
