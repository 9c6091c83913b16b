"""lmms-eval's generic Hugging Face model evaluates a saved checkpoint as it is, without an adapter.

lmms-eval needs torchvision and decord, which do not install beside this machine's CPU torch, so
this test replays its calls: `lmms_eval/models/chat/huggingface.py` (class `Huggingface`, lmms-eval
0.7.x, as in the repository at commit 1b4579e) and `ChatMessages.to_hf_messages` /
`extract_media` in `lmms_eval/protocol.py`, with the same arguments in the same order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from conftest import shape_image, tone
from phi3mm.real_parts import phi35_tokenizer_path
from phi3mm.build import build_tiny_model, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("lmms")
    model, processor = build_tiny_model(work / "components", tokenizer=phi35_tokenizer_path())
    return str(save_checkpoint(model, processor, work / "checkpoint"))


def lmms_messages(system_prompt: str | None = None) -> list[list[dict]]:
    """Two documents as `ChatMessages.to_hf_messages()` gives them (media under their type's key)."""
    image = Image.fromarray(shape_image())
    clip = {"array": tone(seconds=1.0), "sampling_rate": 16_000}
    docs = [
        [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What color is it?"}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "High or low?"}]}],
    ]
    if system_prompt:
        docs = [[{"role": "system", "content": [{"type": "text", "text": system_prompt}]}, *doc] for doc in docs]
    return docs


def extract_media(messages: list[dict]) -> tuple[list, list, list]:
    """`ChatMessages.extract_media`: every image, video and audio part's payload, in order."""
    found = {"image": [], "video": [], "audio": []}
    for message in messages:
        for part in message["content"]:
            if part["type"] in found:
                found[part["type"]].append(part[part["type"]])
    return found["image"], found["video"], found["audio"]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_lmms_eval_generic_model_loads_and_generates(checkpoint, batch_size):
    # __init__: the model class by the config's model_type, else AutoModel
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    if config.model_type in AutoModelForCausalLM._model_mapping.keys():
        model_cls = AutoModelForCausalLM
    elif config.model_type in AutoModelForImageTextToText._model_mapping.keys():
        model_cls = AutoModelForImageTextToText
    else:
        model_cls = AutoModel
    assert model_cls is AutoModel  # a remote-code model type: lmms-eval takes the AutoModel road
    model = model_cls.from_pretrained(checkpoint, trust_remote_code=True, dtype="bfloat16", device_map="cpu").eval()
    assert hasattr(model, "generate") and model.can_generate()
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
    # lmms-eval stops generation at tokenizer.eos_token_id (it overrides generation_config's eos
    # ids): that must be the end of an answer, Phi-3's <|end|>.
    assert tokenizer.eos_token == "<|end|>" and tokenizer.eos_token_id in model.generation_config.eos_token_id

    # generate_until, one chunk of the batch size
    batched_messages = lmms_messages("Answer in one word.")[:batch_size]
    texts = [processor.apply_chat_template(msg, tokenize=False, add_generation_prompt=True) for msg in batched_messages]
    assert texts[0].startswith("<|system|>\nAnswer in one word.<|end|>\n<|user|>\n")
    images, videos, audios = [], [], []
    for messages in batched_messages:
        image, video, audio = extract_media(messages)
        images.append(image)
        videos.append(video)
        audios.append(audio)
    flatten = lambda lists: [item for sub in lists for item in sub]  # noqa: E731
    kwargs = {"images": flatten(images), "videos": flatten(videos), "audios": flatten(audios)}
    padding_side = "left" if batch_size > 1 else "right"
    inputs = processor(text=texts, padding=True, padding_side=padding_side, return_tensors="pt", **kwargs)
    inputs = inputs.to(torch.device("cpu"))
    cont = model.generate(
        **inputs,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        temperature=None,
        top_p=None,
        num_beams=1,
        max_new_tokens=8,
        use_cache=True,
    )
    trimmed = [out_ids[len(in_ids) :] for in_ids, out_ids in zip(inputs.input_ids, cont)]
    answers = processor.batch_decode(trimmed, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert len(answers) == batch_size and all(isinstance(answer, str) for answer in answers)
    assert all(0 < len(ids) <= 8 for ids in trimmed)


def test_videos_are_refused_with_a_clear_message(checkpoint):
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    with pytest.raises(ValueError, match="not video"):
        processor(text="<|user|>\nWhat happens?<|end|>\n", videos=[np.zeros((2, 8, 8, 3), np.uint8)])
