"""python -m space.make_examples      # from the repository root

Writes the app's bundled examples to space/examples/: two shape pictures and two clips, drawn and
synthesised offline by the same generator as the demo data set, so the demo model can answer them.
Run it from a checkout of the repository (it uses `phi3mm.demo_data`); the Space itself only needs
the files it writes, which are committed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from phi3mm.demo_data import SR, draw_image, synth_beeps, synth_tone

SPACE_DIR = Path(__file__).resolve().parent

IMAGE_SIZE = 256  # bigger than the 64 px training images so they look good in the chat; CLIP resizes anyway


def main() -> None:
    out = SPACE_DIR / "examples"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(2024)
    draw_image(rng, IMAGE_SIZE, "circle", "red", "left").save(out / "red_circle.png", optimize=True)
    draw_image(rng, IMAGE_SIZE, "triangle", "blue", "right").save(out / "blue_triangle.png", optimize=True)
    sf.write(out / "low_tone.wav", synth_tone(rng, "low").astype(np.float32), SR, subtype="PCM_16")
    sf.write(out / "three_beeps.wav", synth_beeps(rng, 3).astype(np.float32), SR, subtype="PCM_16")
    for path in sorted(out.iterdir()):
        print(f"{path.relative_to(SPACE_DIR.parent)}  {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
