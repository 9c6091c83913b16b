"""python -m space.make_examples      # from the repository root

Writes the app's bundled examples to space/examples/: two pictures and two clips, drawn and
synthesised offline by the same generators as the demo data set, so the demo model can answer
them: a lone red circle, a scene of three shapes, a low tone and three beeps.
Run it from a checkout of the repository (it uses `phi3mm.demo_data`); the Space itself only needs
the files it writes, which are committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from phi3mm.demo_data import SR, synth_beeps, synth_tone
from phi3mm.demo_scenes import draw_scene

SPACE_DIR = Path(__file__).resolve().parent

IMAGE_SIZE = 256  # bigger than the 64 px training images so they look good in the chat; CLIP resizes anyway


def main() -> None:
    out = SPACE_DIR / "examples"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(2024)
    # Scenes in 64 px coordinates, drawn at IMAGE_SIZE: the same picture at a finer grain.
    scale = IMAGE_SIZE // 64
    lone = {"background": [255, 255, 255], "shapes": [{"shape": "circle", "color": "red", "x0": 6, "y0": 20, "d": 22}]}
    three = {"background": [236, 242, 250], "shapes": [
        {"shape": "triangle", "color": "blue", "x0": 38, "y0": 8, "d": 20},
        {"shape": "square", "color": "orange", "x0": 6, "y0": 36, "d": 16},
        {"shape": "circle", "color": "black", "x0": 40, "y0": 40, "d": 14}]}  # fmt: skip
    for name, scene in (("red_circle.png", lone), ("blue_triangle.png", three)):
        shapes = [{**s, **{k: s[k] * scale for k in ("x0", "y0", "d")}} for s in scene["shapes"]]
        draw_scene({**scene, "shapes": shapes}, IMAGE_SIZE).save(out / name, optimize=True)
    sf.write(out / "low_tone.wav", synth_tone(rng, "low").astype(np.float32), SR, subtype="PCM_16")
    sf.write(out / "three_beeps.wav", synth_beeps(rng, 3).astype(np.float32), SR, subtype="PCM_16")
    for path in sorted(out.iterdir()):
        print(f"{path.relative_to(SPACE_DIR.parent)}  {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
