"""Two-stage training of the multimodal model with Hugging Face `Trainer` (QLoRA by default).

    python train_trainer.py configs/pretrain.yaml        # stage 1: projectors only, LM frozen
    python train_trainer.py configs/finetune.yaml        # stage 2: QLoRA on the LM + projectors
    python train_trainer.py --model_name_or_path outputs/stage1/model --data_path llava_instruct_150k.json \\
        --image_folder coco/train2017 --stage finetune --output_dir outputs/stage2 --bf16 true
    accelerate launch --config_file configs/accelerate/ddp.yaml train_trainer.py configs/finetune.yaml
    python train_trainer.py configs/finetune.yaml --resume_from_checkpoint auto  # after a crash or preemption

Every `TrainingArguments` flag works. At the end of a LoRA run the base is loaded again in full
precision, the adapter merged into it (never into 4-bit weights), the merged model compared with
the trained one, and saved with its remote code, processor and model card to `OUTPUT_DIR/model`.
`OUTPUT_DIR/run_summary.json` and `OUTPUT_DIR/loss.png` record the run.

This file is the command only: the arguments and everything a stage does live in `phi3mm.training`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from phi3mm.training import DataArguments, ModelArguments, end_worker_process, train


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Flags, or one YAML/JSON file of arguments followed by flags that override it."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].endswith((".yaml", ".yml", ".json")):
        # The file's values become the parser's defaults (not dataclasses yet: a value the flags
        # override, such as bf16 on a CPU, must not be validated first).
        import yaml

        text = Path(argv[0]).read_text()
        values = yaml.safe_load(text) if argv[0].endswith((".yaml", ".yml")) else json.loads(text)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"{argv[0]}: unknown arguments {unknown}")
        parser.set_defaults(**values)
        argv = argv[1:]
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if data_args.data_path is None:
        parser.error("--data_path is required (as a flag or in the arguments file)")
    return model_args, data_args, training_args


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return train(*parse_args(argv))


if __name__ == "__main__":
    main()
    end_worker_process()  # a distributed run's other processes: no teardown around gloo's threads
