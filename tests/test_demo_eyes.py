"""The demo's eyes stage: what each patch is labelled, and that training the tower on the labels
makes it see them (the heads are thrown away, the tower keeps what it learned)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from phi3mm import demo_scenes as scenes
from phi3mm.build import build_tiny_model
from phi3mm.demo_eyes import draw_pictures, patch_classes, train_eyes

pytestmark = pytest.mark.usefixtures("one_thread")
WIDE = scenes.FAMILIES["wide"]


def label(shape: str, color: str) -> int:
    return 1 + scenes.SHAPES.index(shape) * len(WIDE.colors) + WIDE.colors.index(color)


def test_each_patch_is_labelled_with_the_shape_covering_most_of_it():
    # 16 px patches, 4 to a row. The square covers x and y 10-29: 36 px of patch 0, 84 of patches 1
    # and 4, 196 of patch 5. The circle's box is x and y 40-59 (patches 10, 11, 14 and 15). The
    # one-pixel triangle in patch 12 is under MIN_PIXELS.
    square = {"shape": "square", "color": "red", "x0": 10, "y0": 10, "d": 20}
    circle = {"shape": "circle", "color": "blue", "x0": 40, "y0": 40, "d": 20}
    sliver = {"shape": "triangle", "color": "gray", "x0": 1, "y0": 62, "d": 1}  # 1 pixel: background
    classes = patch_classes({"background": [255] * 3, "shapes": [square, circle, sliver]}, 64, 16, WIDE)
    expected = np.zeros(16, dtype=int)
    expected[[0, 1, 4, 5]] = label("square", "red")
    expected[[10, 11, 14, 15]] = label("circle", "blue")
    np.testing.assert_array_equal(classes, expected)


def test_the_shape_covering_more_of_a_shared_patch_wins_it():
    big = {"shape": "square", "color": "green", "x0": 1, "y0": 1, "d": 12}  # 144 px of patch 0
    small = {"shape": "square", "color": "black", "x0": 13 + scenes.GAP, "y0": 1, "d": 1}  # 1 px of patch 0
    wide = {"shape": "square", "color": "yellow", "x0": 14, "y0": 4, "d": 10}  # 2 x 10 px of patch 0, 80 of patch 1
    classes = patch_classes({"background": [255] * 3, "shapes": [small, wide, big]}, 64, 16, WIDE)
    assert classes[0] == label("square", "green") and classes[1] == label("square", "yellow")


def test_labels_follow_the_pixels_at_any_canvas_and_patch_size():
    rng = np.random.default_rng(0)
    for size, patch in ((64, 16), (64, 8), (128, 32)):
        for _ in range(20):
            scene = scenes.sample_scene(rng, size, family=WIDE)
            classes = patch_classes(scene, size, patch, WIDE)
            grid = size // patch
            for s in scene["shapes"]:  # the patch holding a shape's centre is that shape's
                cx, cy = int(s["x0"] + s["d"] / 2), int(s["y0"] + 0.7 * s["d"])  # inside every kind
                assert classes[(cy // patch) * grid + cx // patch] == label(s["shape"], s["color"])
            assert (classes == 0).sum() >= 1  # never a canvas full of shapes


def test_training_the_eyes_makes_the_tower_label_patches_it_has_not_seen(tmp_path):
    torch.manual_seed(0)
    model, processor = build_tiny_model(tmp_path, with_audio=False, vision_hidden_size=64, vision_layers=2,
                                        vision_attention_heads=4)  # fmt: skip
    tower_before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    _, held_out_classes, _ = draw_pictures(processor.image_processor, 64, 16, 300, 2000, WIDE)  # train_eyes' held-out
    background = (held_out_classes == 0).float().mean().item() * 100
    figures = train_eyes(model, processor, WIDE, n_pictures=2048, epochs=4, lr=3e-3, n_eval=300, log=lambda _: None)
    # A tower that learned nothing labels every patch background (or worse); one that sees names the
    # coloured shapes on new pictures, from both renderers.
    for renderer in ("generator", "independent"):
        assert figures[renderer]["patches"] > background + 5, (figures, background)
        assert figures[renderer]["colours"] > 20, figures
    assert any(not torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower_before.items())
    assert not model.model.vision_tower.training


@pytest.mark.parametrize(("n_pictures", "epochs"), [(63, 1), (64, 0)])
def test_too_few_pictures_or_no_epoch_is_a_clear_error_before_anything_is_drawn(n_pictures, epochs):
    # No model is needed to refuse: the check comes first, so nothing is drawn or trained in vain.
    with pytest.raises(ValueError, match="at least one step"):
        train_eyes(None, None, WIDE, n_pictures=n_pictures, epochs=epochs, lr=2e-3, batch_size=64)
