"""Write a tiny randomly initialised checkpoint, offline, that loads like the real one.

    python scripts/make_tiny_checkpoint.py outputs/tiny [--no-audio] [--image_token_pooling 2]

The checkpoint has an audio tower and LLaVA-1.5's vision defaults (layer -2, CLS dropped, no
pooling), a tokenizer built locally with Phi-3.5's special tokens and chat template, and the
three model files, so `AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(OUT_DIR, trust_remote_code=True)` load it.
"""

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phi3mm.build import build_tiny_model, save_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--no-audio", dest="with_audio", action="store_false", help="no Whisper tower")
    parser.add_argument("--image_token_pooling", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as components:
        model, processor = build_tiny_model(
            components, with_audio=args.with_audio, image_token_pooling=args.image_token_pooling, seed=args.seed
        )
        save_checkpoint(model, processor, args.out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out_dir} ({n_params / 1e6:.2f}M parameters, audio tower: {args.with_audio})")


if __name__ == "__main__":
    main()
