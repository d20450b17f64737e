"""Models: registry errors, parameter counts against published ones, seed parameter names, forward passes."""

from __future__ import annotations

import pytest
import torch

from speakerid.errors import SpeakeridError
from speakerid.models import MODELS, build_model, summary

# (registry name, options, published parameter count, count measured here)
PARAMETER_COUNTS = [
    ("ResNetSE34L", {"nOut": 512}, 1.4e6, 1_437_078),  # "In defence of metric learning", Table 1
    ("ResNetSE34V2", {"nOut": 512, "n_mels": 64, "encoder_type": "ASP"}, 8.0e6, 8_028_492),  # voxceleb_trainer README
    ("ECAPA_TDNN", {"channels": 1024}, 14.7e6, 14_657_472),  # Desplanques et al. 2020, Table 2
    ("ECAPA_TDNN", {"channels": 512}, 6.2e6, 6_191_104),
    ("ResNet34", {}, 6.63e6, 6_634_336),  # WeSpeaker's ResNet34 (80 fbank, 256-dim)
    ("ResNetSE34", {"nOut": 512}, None, 1_437_078),  # thin: the same tensors as ResNetSE34L with SAP
    ("VGGVox40", {"nOut": 512}, None, 4_032_448),
]

# (name, options, samples of the two test lengths, embedding size); lengths as short as each model allows
FORWARD_CASES = [
    ("ResNetSE34L", {"nOut": 64, "encoder_type": "SAP"}, (8000, 9760), 64),
    ("ResNetSE34L", {"nOut": 64, "encoder_type": "ASP", "window": "hann"}, (8000, 9760), 64),
    ("ResNetSE34V2", {"nOut": 64, "n_mels": 64, "encoder_type": "ASP"}, (8000, 9760), 64),
    ("ResNetSE34V2", {"nOut": 64, "encoder_type": "SAP"}, (8000, 9760), 64),
    ("ResNetSE34", {"nOut": 64}, (4800, 6400), 64),
    ("VGGVox40", {"nOut": 64, "encoder_type": "SAP"}, (16240, 19440), 64),
    ("VGGVox40", {"nOut": 64, "encoder_type": "TAP"}, (16240, 19440), 64),
    ("VGGVox40", {"nOut": 64, "encoder_type": "MAX"}, (16240, 19440), 64),
    ("ECAPA_TDNN", {"channels": 512}, (8000, 9760), 192),
    ("ResNet34", {}, (8000, 9760), 256),
]


def waveforms(batch: int, samples: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, samples, generator=generator)


@pytest.mark.parametrize("name,options,published,measured", PARAMETER_COUNTS,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}" for c in PARAMETER_COUNTS])
def test_parameter_counts_match_published(name, options, published, measured):
    counts = summary(name, show=False, **options)
    assert counts.n_parameters == counts.n_trainable == measured
    if published is not None:
        assert abs(counts.n_parameters - published) / published < 0.03
    assert sum(counts.by_module.values()) == measured


@pytest.mark.parametrize("name,options,lengths,dim", FORWARD_CASES,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}" for c in FORWARD_CASES])
def test_forward_two_lengths_and_bf16_autocast(name, options, lengths, dim):
    torch.manual_seed(0)
    model = build_model(name, **options).eval()
    with torch.no_grad():
        for samples in lengths:
            embeddings = model(waveforms(2, samples))
            assert embeddings.shape == (2, dim) and embeddings.dtype == torch.float32
            assert torch.isfinite(embeddings).all()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(waveforms(2, lengths[0]))
    assert mixed.shape == (2, dim) and torch.isfinite(mixed.float()).all()


def test_training_step_reaches_every_parameter_but_not_the_front_end():
    torch.manual_seed(0)
    model = build_model("ResNetSE34L", nOut=32, encoder_type="ASP").train()
    x = waveforms(3, 8000).requires_grad_(True)
    model(x).pow(2).sum().backward()
    assert x.grad is None  # features are computed without gradient, as in the seed
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_seed_models_carry_the_seeds_parameter_names_and_shapes():
    l_state = build_model("ResNetSE34L", nOut=512).state_dict()
    expected = {
        "torchfb.spectrogram.window": (400,), "torchfb.mel_scale.fb": (257, 40), "conv1.weight": (16, 1, 7, 7),
        "layer1.0.conv1.weight": (16, 16, 3, 3), "layer1.0.se.fc.0.weight": (2, 16), "layer1.0.se.fc.2.bias": (16,),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1), "layer4.0.downsample.1.running_var": (128,),
        "sap_linear.weight": (128, 128), "attention": (128, 1), "fc.weight": (512, 128),
    }
    assert {key: tuple(l_state[key].shape) for key in expected} == expected
    assert "layer1.0.downsample.0.weight" not in l_state

    v2_state = build_model("ResNetSE34V2", nOut=512, n_mels=64, encoder_type="ASP").state_dict()
    expected = {
        "torchfb.0.flipped_filter": (1, 1, 2), "torchfb.1.mel_scale.fb": (257, 64), "conv1.bias": (32,),
        "attention.0.weight": (128, 2048, 1), "attention.2.running_mean": (128,), "attention.3.weight": (2048, 128, 1),
        "fc.weight": (512, 4096), "layer4.2.se.fc.0.weight": (32, 256),
    }
    assert {key: tuple(v2_state[key].shape) for key in expected} == expected

    vgg_state = build_model("VGGVox", nOut=1024, encoder_type="SAP").state_dict()
    expected = {"netcnn.0.weight": (96, 1, 5, 7), "netcnn.4.weight": (256, 96, 5, 5), "netcnn.18.weight": (512, 256, 4, 1),
                "netcnn.19.num_batches_tracked": (), "sap_linear.weight": (512, 512), "attention": (512, 1),
                "fc.weight": (1024, 512), "torchfb.mel_scale.fb": (257, 40)}
    assert {key: tuple(vgg_state[key].shape) for key in expected} == expected
    max_state = build_model("VGGVox40", encoder_type="MAX").state_dict()
    assert not any(key.startswith(("sap_linear", "attention")) for key in max_state)

    thin_state = build_model("ResNetSE34").state_dict()
    assert not any(key.startswith(("stft", "torchfb")) for key in thin_state)  # the seed makes its window in forward
    assert tuple(thin_state["layer4.0.downsample.0.weight"].shape) == (128, 64, 1, 1)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(SpeakeridError) as error:
        build_model("ResNet99")
    assert all(name in str(error.value) for name in MODELS)


def test_unknown_or_mistyped_option_lists_the_valid_ones():
    with pytest.raises(SpeakeridError, match=r"no option 'nout'.*n_out=256.*encoder_type='SAP'"):
        build_model("ResNetSE34L", nout=512)
    with pytest.raises(SpeakeridError, match="should be of type int"):
        build_model("ResNetSE34L", nOut="512")
    with pytest.raises(SpeakeridError, match="should be of type bool"):
        build_model("VGGVox40", log_input=1)
    with pytest.raises(SpeakeridError, match="given twice"):
        build_model("ResNetSE34L", nOut=512, n_out=256)
    with pytest.raises(SpeakeridError, match="encoder_type='TAP' is not available; valid: SAP, ASP"):
        build_model("ResNetSE34L", encoder_type="TAP")
    with pytest.raises(SpeakeridError, match="valid: SAP, TAP, MAX"):
        build_model("VGGVox40", encoder_type="ASP")


def test_aliases_build_the_same_model():
    assert build_model("VGGVox", nOut=128).fc.out_features == 128
    assert build_model("ResNetSE34L", n_out=100).fc.out_features == 100


def test_summary_prints_the_counts(capsys):
    model = build_model("ResNetSE34L", nOut=512)
    result = summary(model)
    printed = capsys.readouterr().out
    assert result.n_parameters == 1_437_078 and "1,437,078" in printed and "layer3" in printed


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_saves_and_loads_through_safetensors(name, tmp_path):
    """accelerate's save_state writes safetensors, which refuses tensors that are views (e.g. a window buffer)."""
    from safetensors.torch import load_model, save_model

    model = MODELS[name]()
    save_model(model, str(tmp_path / "m.safetensors"))
    load_model(MODELS[name](), str(tmp_path / "m.safetensors"))
