"""Structured pruning: removing a unit equals zeroing its outgoing weights in the full model, and the
pruned model round-trips through its structure()."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from services.compressor.prune.structured import (bert_head_scores, bert_neuron_scores, kept_indices,
                                                  mobilenet_hidden_scores, prune_bert, prune_mobilenet_hidden,
                                                  prune_structured)
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.encoder import BertConfig, SentenceEncoder
from shared.models.vision import MobileNetV2, default_hidden, fold_batchnorm


def dropped(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    mask = torch.ones(len(scores), dtype=torch.bool)
    mask[kept_indices(scores, fraction)] = False
    return mask


@pytest.fixture(scope="module")
def mobilenet() -> MobileNetV2:
    torch.manual_seed(0)
    model = MobileNetV2(classes=10)
    for module in model.modules():                    # BatchNorm statistics that matter
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    return model.eval()


def test_mobilenet_without_hidden_channels_equals_the_masked_full_model(mobilenet):
    pruned = prune_mobilenet_hidden(mobilenet, 0.3)
    masked = copy.deepcopy(mobilenet)
    for block, scores in zip(masked.blocks(), mobilenet_hidden_scores(mobilenet)):
        if len(block.conv) == 4:                      # expanding blocks: the projection's columns
            block.conv[2].weight.data[:, dropped(scores, 0.3)] = 0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(pruned(x), masked(x), atol=1e-5)
    hidden = pruned.structure()["hidden"]
    assert hidden[0] == 32 and hidden[1] == 96 - round(0.3 * 96)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in mobilenet.parameters())
    rebuilt = MobileNetV2(**json.loads(json.dumps(pruned.structure())))
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)


def test_mobilenet_pruning_works_the_same_with_batchnorm_folded(mobilenet):
    x = torch.randn(1, 3, 64, 64)
    folded = prune_mobilenet_hidden(fold_batchnorm(copy.deepcopy(mobilenet)), 0.5)
    with torch.no_grad():
        assert torch.allclose(folded(x), prune_mobilenet_hidden(mobilenet, 0.5)(x), atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_mobilenet_default_structure_is_the_standard_one():
    assert MobileNetV2().structure()["hidden"] == default_hidden()
    with pytest.raises(InvalidArgument):
        MobileNetV2(hidden=[8] * 3)


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    return SentenceEncoder(config).eval()


def test_bert_without_neurons_and_heads_equals_the_masked_full_model(encoder):
    pruned = prune_bert(encoder, neurons=0.25, heads=0.5)
    assert pruned.structure() == {"intermediate": [48, 48], "heads": [2, 2]}
    masked = copy.deepcopy(encoder)
    for layer, neurons, heads in zip(masked.encoder.layer, bert_neuron_scores(encoder), bert_head_scores(encoder)):
        layer.output.dense.weight.data[:, dropped(neurons, 0.25)] = 0
        layer.attention.output.dense.weight.data[:, dropped(heads, 0.5).repeat_interleave(layer.head_dim)] = 0
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        assert torch.allclose(pruned(ids, mask), masked(ids, mask), atol=1e-6)
    rebuilt = SentenceEncoder(encoder.config, **pruned.structure())
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)


def test_dispatch_by_family_and_unit(encoder, mobilenet):
    assert prune_structured(encoder, "heads", 0.25).structure()["heads"] == [3, 3]
    assert prune_structured(encoder, "neurons", 0.5).structure()["intermediate"] == [32, 32]
    assert prune_structured(mobilenet, "neurons", 0.5).structure()["hidden"][1] == 48
    with pytest.raises(FailedPrecondition):
        prune_structured(mobilenet, "heads", 0.5)
    with pytest.raises(InvalidArgument):
        prune_structured(encoder, "layers", 0.5)
    with pytest.raises(InvalidArgument):
        prune_structured(encoder, "heads", 1.0)


def test_dispatch_reaches_the_small_cnn():
    cnn = pytest.importorskip("shared.models.cnn")
    model = cnn.SmallCNN()
    pruned = prune_structured(model, "neurons", 0.5)
    assert isinstance(pruned, cnn.SmallCNN) and pruned.structure()["channels"] == [8, 16]
