"""Networks from model cards: the published architecture's size, safe weight loading, clear errors."""

import os
import pickle

import pytest
import torch

from MRISuperResLib.errors import InputError
from MRISuperResLib.priors import folder, synthetic, ukbb


def test_published_architecture_parameter_counts():
    # built on the meta device: no memory, no time
    ae = folder.build({"class": "AutoencoderKL", "kwargs": ukbb.AUTOENCODER_KWARGS}, device="meta")
    unet = folder.build({"class": "DiffusionModelUNet", "kwargs": ukbb.UNET_KWARGS}, device="meta")
    assert folder.count_parameters(ae) == ukbb.AUTOENCODER_PARAMETERS == 13766248
    assert folder.count_parameters(unet) == ukbb.UNET_PARAMETERS == 553168899
    z = torch.zeros(1, 3, 20, 28, 20, device="meta")
    assert tuple(ae.decode(z).shape) == (1, 1, 160, 224, 160)  # the card's latent and grid agree


def test_unknown_class_and_bad_kwargs_are_user_errors():
    with pytest.raises(InputError, match="not supported"):
        folder.build({"class": "os.system", "kwargs": {}})
    with pytest.raises(InputError, match="arguments are invalid"):
        folder.build({"class": "AutoencoderKL", "kwargs": {"spatial_dims": 3, "no_such_argument": 1}})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    path = str(tmp_path / "autoencoder.pt")
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(InputError, match="plain state dict"):
        folder.read_state_dict(path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    small = synthetic.random_prior(synthetic.tiny_card(channels=(8, 8)))
    other = synthetic.tiny_card(channels=(8, 16))
    net = folder.build(other["networks"]["autoencoder"], device="meta")
    with pytest.raises(InputError, match="do not fit"):
        folder.load_weights(net, small.autoencoder.state_dict(), "x.pt")


def test_safetensors_round_trip(tmp_path):
    prior = synthetic.random_prior(synthetic.tiny_card(), seed=3)
    path = str(tmp_path / "ae.safetensors")
    digest = folder.save_weights(prior.autoencoder, path)
    assert digest == folder.file_digest(path) and len(digest) == 64
    net = folder.build(prior.card["networks"]["autoencoder"], device="meta")
    net = folder.load_weights(net, folder.read_state_dict(path), path)
    z = torch.randn(1, 3, 8, 8, 8)
    assert torch.equal(net.decode(z), prior.autoencoder.decode(z))


def _small_unet(**extra):
    kwargs = {"spatial_dims": 3, "in_channels": 2, "out_channels": 1, "channels": [8, 16], "num_res_blocks": 1,
              "attention_levels": [False, True], "norm_num_groups": 8, "num_head_channels": 8}
    return folder.build({"class": "DiffusionModelUNet", "kwargs": dict(kwargs, **extra)})


def _attention_flags(net):
    return [m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention")]


def test_attention_runs_fused_unless_the_card_or_the_environment_says_otherwise(monkeypatch):
    monkeypatch.setenv(folder.ATTENTION_ENV, "explicit")
    assert not any(_attention_flags(_small_unet()))
    monkeypatch.delenv(folder.ATTENTION_ENV)
    fused, explicit = _small_unet(), _small_unet(use_flash_attention=False)
    assert _attention_flags(fused) and all(_attention_flags(fused))
    assert _attention_flags(explicit) and not any(_attention_flags(explicit))
    explicit.load_state_dict(fused.state_dict())  # same parameters: the published weights still load
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 16, 16, 16, generator=g)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        a, b = fused(x, t), explicit(x, t)
    assert torch.allclose(a, b, atol=1e-5 * float(b.abs().max()), rtol=0)


def test_loaded_networks_take_the_channels_last_layout_on_the_cpu_with_the_same_answer(monkeypatch):
    from conftest import assert_same_to_float32_rounding

    net = _small_unet()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 16, 16, 16, generator=g)
    t = torch.tensor([999, 10])
    with torch.no_grad():
        before = net(x, t)
        fast = folder.with_fast_layout(net, "cpu")
        conv = [m for m in fast.modules() if isinstance(m, torch.nn.Conv3d)][0]
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        assert not conv.weight.is_contiguous()
        assert_same_to_float32_rounding(fast(x, t), before)
    monkeypatch.setenv(folder.LAYOUT_ENV, "contiguous")
    plain = folder.with_fast_layout(_small_unet(), "cpu")
    assert [m for m in plain.modules() if isinstance(m, torch.nn.Conv3d)][0].weight.is_contiguous()


def test_weights_saved_from_a_channels_last_network_are_the_same_file(tmp_path):
    net = _small_unet()
    plain = folder.save_weights(net, str(tmp_path / "plain.safetensors"))
    fast = folder.save_weights(folder.with_fast_layout(net, "cpu"), str(tmp_path / "fast.safetensors"))
    assert plain == fast
