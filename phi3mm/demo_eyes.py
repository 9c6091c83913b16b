"""The demo's eyes: its tiny random CLIP tower taught, alone, what covers each patch of a picture.

A real run starts from a pretrained CLIP. None is available offline, and a random tower trained
only through the language model's answers does not learn to tell the wide family's shapes apart
(README). So before stage 1 the demo trains the tower on pictures drawn for the purpose (not the
training rows'): each patch is labelled with the one shape-and-colour covering most of it, or the
background, and the mean of the patch features with the number of shapes. The heads are thrown
away; the tower keeps what they made it see.

Why one class per patch: a multi-label target per patch (every shape touching it) left the tower
timid, missing a colour in half the held-out pictures after 20 epochs; one class per patch gets
96.2% of held-out patches right (README, "The wide pictures").
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from phi3mm import demo_scenes as scenes

# A shape claims a patch from this many of its pixels (of 16 x 16): slivers are background.
MIN_PIXELS = 4


def patch_classes(scene: dict, size: int, patch: int, family: scenes.Family) -> np.ndarray:
    """Per patch, row by row: 0 for the background, else 1 + the index of the shape-and-colour
    (`SHAPES` x `family.colors`) covering most of the patch."""
    grid = size // patch
    best, classes = np.zeros(grid * grid), np.zeros(grid * grid, dtype=np.int64)
    for shape in scene["shapes"]:
        mask = np.asarray(scenes.shape_mask(shape, size), dtype=float)
        cover = mask.reshape(grid, patch, grid, patch).sum(axis=(1, 3)).ravel()
        label = 1 + scenes.SHAPES.index(shape["shape"]) * len(family.colors) + family.colors.index(shape["color"])
        wins = (cover > best) & (cover >= MIN_PIXELS * (patch / 16) ** 2)
        classes[wins], best[wins] = label, cover[wins]
    return classes


def draw_pictures(image_processor, size: int, patch: int, n: int, seed: int, family: scenes.Family,
                  independent: bool = False):  # fmt: skip
    """`n` scenes of `family` drawn by the generator (or the independent renderer), as
    (pixel_values, patch classes, shape counts)."""
    rng = np.random.default_rng(seed)
    scene_list = [scenes.sample_scene(rng, size, continuous=independent, family=family) for _ in range(n)]
    images = [
        scenes.draw_scene_independent(s, rng, size) if independent else scenes.draw_scene(s, size) for s in scene_list
    ]
    pixels = image_processor(images, return_tensors="pt")["pixel_values"]
    classes = torch.from_numpy(np.stack([patch_classes(s, size, patch, family) for s in scene_list]))
    counts = torch.tensor([len(s["shapes"]) - 1 for s in scene_list])
    return pixels, classes, counts


def train_eyes(model, processor, family: scenes.Family, n_pictures: int, epochs: int, lr: float,
               batch_size: int = 64, seed: int = 0, n_eval: int = 500, log=print) -> dict:  # fmt: skip
    """Trains `model`'s vision tower in place on `n_pictures` fresh pictures of `family`; returns
    its figures on held-out pictures of both renderers (see `eyes_figures`)."""
    if n_pictures < batch_size or epochs < 1:
        raise ValueError(f"the eyes stage needs at least one step: {n_pictures} pictures in batches of {batch_size}, "
                         f"{epochs} epochs")  # fmt: skip
    torch.manual_seed(seed)
    inner = model.model
    tower = inner.vision_tower
    vision = inner.config.vision_config
    width = vision.hidden_size
    n_classes = 1 + len(scenes.SHAPES) * len(family.colors)
    heads = torch.nn.ModuleDict({"patch": torch.nn.Linear(width, n_classes), "count": torch.nn.Linear(width, 3)})
    start = time.perf_counter()
    draw = lambda n, seed, independent=False: draw_pictures(processor.image_processor, vision.image_size, vision.patch_size,
                                                            n, seed, family, independent)  # fmt: skip
    pixels, classes, counts = draw(n_pictures, seed + 1000)
    held_out = {"generator": draw(n_eval, seed + 2000), "independent": draw(n_eval, seed + 3000, independent=True)}
    drawn = time.perf_counter() - start
    params = [*tower.parameters(), *heads.parameters()]
    for p in tower.parameters():
        p.requires_grad_(True)
    steps_per_epoch = n_pictures // batch_size
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    tower.train()
    for epoch in range(epochs):
        order, total = torch.randperm(n_pictures, generator=generator), 0.0
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            features = inner.select_vision_features(pixels[batch])
            patch_loss = F.cross_entropy(heads["patch"](features).flatten(0, 1), classes[batch].flatten())
            count_loss = F.cross_entropy(heads["count"](features.mean(1)), counts[batch])
            loss = patch_loss + count_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        log(f"eyes epoch {epoch + 1}/{epochs}: loss {total / steps_per_epoch:.4f}")
    tower.eval()
    figures = {name: eyes_figures(inner, heads, *data, family) for name, data in held_out.items()}
    figures["seconds"] = {"draw": round(drawn, 1), "train": round(time.perf_counter() - start - drawn, 1)}
    return figures


@torch.no_grad()
def eyes_figures(inner, heads, pixels, classes, counts, family: scenes.Family) -> dict:
    """Shares of held-out patches labelled right, and of pictures whose shape count, set of colours,
    set of shape kinds and exact set of coloured shapes the patch labels get right."""
    features = inner.select_vision_features(pixels)
    predicted = heads["patch"](features).argmax(-1)
    n_colors = len(family.colors)

    def present(labels):  # (pictures, shapes x colours) booleans
        hot = F.one_hot(labels, 1 + len(scenes.SHAPES) * n_colors)[..., 1:].any(1)
        return hot.view(len(labels), len(scenes.SHAPES), n_colors)

    seen, truth = present(predicted), present(classes)
    share = lambda right: round(right.float().mean().item() * 100, 1)
    return {
        "patches": share(predicted == classes),
        "count": share(heads["count"](features.mean(1)).argmax(-1) == counts),
        "colours": share((seen.any(1) == truth.any(1)).all(-1)),
        "kinds": share((seen.any(2) == truth.any(2)).all(-1)),
        "exact": share((seen == truth).flatten(1).all(-1)),
    }
