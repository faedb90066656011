"""Tiny random-weight zero-shot detectors saved as Hugging Face directories, for tests.

No weights can be downloaded here, so each detector is built from transformers' own config
classes at a tiny size, seeded, and written with ``save_pretrained(..., safe_serialization=True)``
together with its processor (image processor + a tokenizer built from a tiny vocabulary):

- ``make_grounding_dino_dir(path)``: Grounding DINO with a tiny Swin backbone and a tiny BERT;
  its processor resizes to shortest edge 64 / longest edge 96.
- ``make_owlv2_dir(path)``: OWLv2 with a tiny ViT and a tiny CLIP text model; 64x64 input.

The session fixtures ``grounding_dino_dir`` and ``owlv2_dir`` build each once per session; import
them into a test module (``from tests.detector_factory import grounding_dino_dir``).
``random_images`` gives seeded RGB uint8 test images.
"""
from __future__ import annotations

import inspect
import string
from pathlib import Path

import numpy as np
import pytest
import torch

# Words the tiny vocabularies know; prompts in tests should use these.
WORDS = ["car", "person", "dog", "cat", "bird", "tree", "traffic", "light", "a", "the"]

# Processor sizes: small enough for a fast CPU test, large enough for the model's deepest level.
GDINO_SHORTEST_EDGE = 64
GDINO_LONGEST_EDGE = 96
OWL_IMAGE_SIZE = 64


def _tokenizer_vocab_kwarg(tokenizer_class) -> str:
    # transformers 5 takes the vocabulary as `vocab`; 4.x took a file as `vocab_file`.
    return "vocab" if "vocab" in inspect.signature(tokenizer_class.__init__).parameters else "vocab_file"


# Grounding DINO's published "tiny" (Swin-T backbone, BERT-base text encoder, 6+6 layers, 900 queries),
# for benchmarks: random weights of the real shapes. Its processor's sizes are set by the caller.
GDINO_TINY_SIZES = dict(
    swin=dict(patch_size=4, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
    bert=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=512),
    dino=dict(d_model=256, encoder_layers=6, decoder_layers=6, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
              encoder_attention_heads=8, decoder_attention_heads=8, num_queries=900, encoder_n_points=4,
              decoder_n_points=4, max_text_len=256),
)


def make_grounding_dino_dir(path: Path, seed: int = 0, sizes: dict | None = None,
                            shortest_edge: int = GDINO_SHORTEST_EDGE, longest_edge: int = GDINO_LONGEST_EDGE) -> Path:
    """A random Grounding DINO + processor saved under ``path``; returns ``path``.

    Tiny by default; ``sizes=GDINO_TINY_SIZES`` gives the published tiny model's shapes (benchmarks).
    """
    from transformers import (
        BertConfig,
        BertTokenizerFast,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS]
    vocab_file = path / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(**{_tokenizer_vocab_kwarg(BertTokenizerFast): str(vocab_file)})

    # patch_size 2: the deepest Swin stage (/16) and the extra level (/32) keep >1 pixel at 64 px,
    # which the levels' GroupNorm needs.
    sizes = sizes or dict(
        swin=dict(patch_size=2, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7),
        bert=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                  max_position_embeddings=32),
        dino=dict(d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                  encoder_attention_heads=2, decoder_attention_heads=2, num_queries=20, encoder_n_points=2,
                  decoder_n_points=2, max_text_len=32),
    )  # decoder_layers >= 2: the box heads of layers 1.. are tied to layer 0's
    backbone = SwinConfig(image_size=shortest_edge, out_features=["stage2", "stage3", "stage4"], **sizes["swin"])
    text = BertConfig(vocab_size=len(vocab), **sizes["bert"])
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, **sizes["dino"])
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge}
    )
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def make_owlv2_dir(path: Path, seed: int = 0) -> Path:
    """A tiny random OWLv2 + processor saved under ``path``; returns ``path``."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE with no merges: every word is spelt letter by letter ("car" -> c a r</w>).
    # The special tokens come last, as in CLIP: OWL treats a query whose first id is 0 as padding.
    vocab = {letter: i for i, letter in enumerate(string.ascii_lowercase)}
    vocab.update({f"{letter}</w>": len(vocab) for letter in string.ascii_lowercase})
    bos, eos = len(vocab), len(vocab) + 1
    vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)

    config = Owlv2Config(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=OWL_IMAGE_SIZE, patch_size=16, hidden_size=32, intermediate_size=37,
            num_hidden_layers=1, num_attention_heads=2,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    with torch.no_grad():
        # Random box-head weights saturate the sigmoid (every box collapses onto an image edge);
        # scaled down, boxes stay near the patch-grid priors and differ from image to image.
        model.box_head.dense2.weight.mul_(0.05)
        model.box_head.dense2.bias.zero_()
    image_processor = Owlv2ImageProcessor(size={"height": OWL_IMAGE_SIZE, "width": OWL_IMAGE_SIZE})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    return path


def random_images(sizes, seed: int = 0) -> list[np.ndarray]:
    """Seeded HxWx3 uint8 RGB images of the given (H, W) sizes, smooth enough to look like photos."""
    rng = np.random.default_rng(seed)
    images = []
    for height, width in sizes:
        coarse = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3)).astype(np.float64)
        rows = np.linspace(0, coarse.shape[0] - 1, height).round().astype(int)
        cols = np.linspace(0, coarse.shape[1] - 1, width).round().astype(int)
        noise = rng.integers(-20, 21, (height, width, 3))
        images.append(np.clip(coarse[rows][:, cols] + noise, 0, 255).astype(np.uint8))
    return images


@pytest.fixture(scope="session")
def grounding_dino_dir(tmp_path_factory) -> Path:
    return make_grounding_dino_dir(tmp_path_factory.mktemp("gdino"))


@pytest.fixture(scope="session")
def owlv2_dir(tmp_path_factory) -> Path:
    return make_owlv2_dir(tmp_path_factory.mktemp("owlv2"))


def transformers_one_by_one(model_dir, model_type, images, classes, box_threshold, text_threshold):
    """transformers' own path, one image at a time: processor -> model -> post-processing.

    The oracle for ``sam_core.detector``: per image, (boxes (N, 4), scores (N,), text labels).
    """
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    model = AutoModelForZeroShotObjectDetection.from_pretrained(model_dir, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    results = []
    for image in images:
        if model_type == "grounding-dino":
            inputs = processor(images=image, text=". ".join(classes) + ".", return_tensors="pt")
            with torch.no_grad():
                outputs = model(**inputs)
            result = processor.post_process_grounded_object_detection(
                outputs, inputs.input_ids, threshold=box_threshold, text_threshold=text_threshold,
                target_sizes=[image.shape[:2]],
            )[0]
        else:
            inputs = processor(images=image, text=[classes], return_tensors="pt")
            with torch.no_grad():
                outputs = model(**inputs)
            result = processor.post_process_grounded_object_detection(
                outputs, threshold=box_threshold, target_sizes=[image.shape[:2]], text_labels=[classes]
            )[0]
        results.append((result["boxes"].numpy(), result["scores"].numpy(), list(result["text_labels"])))
    return results
