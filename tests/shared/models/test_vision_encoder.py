"""The real image classifier and text encoder that exporters are tested on load correctly."""
from __future__ import annotations

import numpy as np
import torch

from shared.models.encoder import EncoderTokenizer, load_encoder
from shared.models.vision import IMAGENET_EGYPTIAN_CAT, IMAGENET_TABBY, PHOTOS, mobilenet_v2, photos


def test_mobilenet_v2_recognises_the_cat_and_folding_keeps_outputs():
    images = torch.from_numpy(photos())
    with torch.no_grad():
        folded, plain = mobilenet_v2()(images), mobilenet_v2(fold=False)(images)
    assert torch.allclose(folded, plain, atol=1e-3)
    top1 = dict(zip(PHOTOS, folded.argmax(1).tolist()))
    assert IMAGENET_TABBY <= top1["chelsea"] <= IMAGENET_EGYPTIAN_CAT        # a cat class (281–285)
    assert top1["coffee"] in (967, 968)                                      # espresso / cup


def test_minilm_embeddings_are_semantic_and_padding_invariant():
    encoder, tokenizer = load_encoder(), EncoderTokenizer()
    texts = ["A man is playing a guitar.", "Someone is playing an instrument.", "The stock market fell sharply today."]
    ids, mask = tokenizer(texts)
    assert ids[0, 0] == 101 and mask[1, -1] == 0                             # [CLS] first; shorter text padded
    with torch.no_grad():
        short = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        padded = encoder(*map(torch.from_numpy, tokenizer(texts, length=32))).numpy()
    assert np.abs(short - padded).max() < 1e-5
    similarity = short @ short.T
    assert similarity[0, 1] > 0.6 and abs(similarity[0, 2]) < 0.2 and np.allclose(np.diag(similarity), 1, atol=1e-5)
