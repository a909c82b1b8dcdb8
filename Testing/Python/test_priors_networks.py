"""Networks from model cards: the published architecture's size, safe weight loading, clear errors."""

import os
import pickle

import pytest
import torch

from MRISuperResLib.errors import InputError
from MRISuperResLib.priors import networks, synthetic, ukbb


def test_published_architecture_parameter_counts():
    # built on the meta device: no memory, no time
    ae = networks.build({"class": "AutoencoderKL", "kwargs": ukbb.AUTOENCODER_KWARGS}, device="meta")
    unet = networks.build({"class": "DiffusionModelUNet", "kwargs": ukbb.UNET_KWARGS}, device="meta")
    assert networks.count_parameters(ae) == ukbb.AUTOENCODER_PARAMETERS == 13766248
    assert networks.count_parameters(unet) == ukbb.UNET_PARAMETERS == 553168899
    z = torch.zeros(1, 3, 20, 28, 20, device="meta")
    assert tuple(ae.decode(z).shape) == (1, 1, 160, 224, 160)  # the card's latent and grid agree


def test_unknown_class_and_bad_kwargs_are_user_errors():
    with pytest.raises(InputError, match="not supported"):
        networks.build({"class": "os.system", "kwargs": {}})
    with pytest.raises(InputError, match="arguments are invalid"):
        networks.build({"class": "AutoencoderKL", "kwargs": {"spatial_dims": 3, "no_such_argument": 1}})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickled_code_is_refused(tmp_path):
    path = str(tmp_path / "autoencoder.pt")
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(InputError, match="plain state dict"):
        networks.read_state_dict(path)


def test_weights_of_another_architecture_are_refused(tmp_path):
    small = synthetic.random_prior(synthetic.tiny_card(channels=(8, 8)))
    other = synthetic.tiny_card(channels=(8, 16))
    net = networks.build(other["networks"]["autoencoder"], device="meta")
    with pytest.raises(InputError, match="do not fit"):
        networks.load_weights(net, small.autoencoder.state_dict(), "x.pt")


def test_safetensors_round_trip(tmp_path):
    prior = synthetic.random_prior(synthetic.tiny_card(), seed=3)
    path = str(tmp_path / "ae.safetensors")
    digest = networks.save_safetensors(prior.autoencoder, path)
    assert digest == networks.file_digest(path) and len(digest) == 64
    net = networks.build(prior.card["networks"]["autoencoder"], device="meta")
    net = networks.load_weights(net, networks.read_state_dict(path), path)
    z = torch.randn(1, 3, 8, 8, 8)
    assert torch.equal(net.decode(z), prior.autoencoder.decode(z))
