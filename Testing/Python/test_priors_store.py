"""The model store: search path, cards, checksums on load, default priors, clear errors."""

import json
import os

import pytest
import torch

from MRISuperResLib.errors import InputError, UserError
from MRISuperResLib.priors import card as cards
from MRISuperResLib.priors import store, synthetic, ukbb


@pytest.fixture
def roots(tmp_path, monkeypatch):
    user, bundled = tmp_path / "user", tmp_path / "bundled"
    user.mkdir()
    bundled.mkdir()
    monkeypatch.setenv(store.ENV_VAR, str(user))
    monkeypatch.setattr(store, "bundled_dirs", lambda: [str(bundled)])
    return user, bundled


def _write(root, name, seed=0, **kw):
    card = synthetic.tiny_card(name=name, **kw)
    card["method_defaults"] = {"inversesr-decoder": {"any": {"lr": 0.05}, "cuda": {"iterations": 7}}}
    return synthetic.write_prior(synthetic.random_prior(card, seed=seed), str(root / name))


def test_models_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "x"))
    assert store.models_dir() == str(tmp_path / "x")
    monkeypatch.delenv(store.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert store.models_dir().startswith(str(tmp_path)) or not os.name == "posix"


def test_bundled_dirs_are_found_relative_to_the_package():
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(store.__file__)))
    for d in store.bundled_dirs():
        assert d in (os.path.join(pkg, "_models"), os.path.join(os.path.dirname(pkg), "Resources", "Models"))


def test_load_by_name_and_path_with_defaults(roots):
    user, bundled = roots
    folder = _write(bundled, "small")
    prior = store.load_prior("small")
    assert prior.folder == folder and prior.kind == "ldm" and prior.unet is not None
    assert store.load_prior(folder).name == "small"
    assert prior.method_defaults("inversesr-decoder", "cpu") == {"lr": 0.05}
    assert prior.method_defaults("inversesr-decoder", "cuda") == {"lr": 0.05, "iterations": 7}
    assert prior.method_defaults("inversesr-ldm", "cpu") == {}
    assert not any(p.requires_grad for p in prior.autoencoder.parameters())


def test_changed_weights_are_refused(roots):
    user, _ = roots
    folder = _write(user, "p")
    with open(os.path.join(folder, "unet.safetensors"), "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(InputError, match="corrupt or was changed"):
        store.load_prior("p")


def test_card_problems_are_named(roots):
    user, _ = roots
    folder = _write(user, "p")
    path = os.path.join(folder, "model.json")
    card = json.load(open(path))
    for change, msg in ((lambda c: c.update(schema=9), "schema"), (lambda c: c.update(kind="gan"), "kind"),
                        (lambda c: c["networks"]["unet"].update(weights="../../etc/passwd"), "plain file name"),
                        (lambda c: c["networks"].pop("unet"), "needs networks"),
                        (lambda c: c["networks"]["unet"].update(sha256=None), "no sha256")):
        bad = json.loads(json.dumps(card))
        change(bad)
        json.dump(bad, open(path, "w"))
        with pytest.raises(InputError, match=msg):
            store.load_prior("p")


def test_unknown_and_missing_priors(roots, tmp_path):
    with pytest.raises(InputError, match="No prior named 'nope'"):
        store.load_prior("nope")
    with pytest.raises(InputError, match="not installed") as exc:
        store.load_prior(ukbb.NAME)
    assert "models import" in exc.value.fix
    (tmp_path / "bundle").mkdir()
    with pytest.raises(InputError, match="Import it first"):
        store.load_prior(str(tmp_path / "bundle"))
    with pytest.raises(UserError, match="No ldm prior is installed") as exc:
        store.default_prior("ldm")
    assert ukbb.BUNDLE in exc.value.fix


def test_default_prior_order(roots):
    user, bundled = roots
    _write(bundled, "shipped")
    _write(user, "mine")
    assert os.path.basename(store.default_prior_folder("ldm", "cpu")) == "shipped"
    assert os.path.basename(store.default_prior_folder("ldm", "cuda")) == "mine"
    assert store.default_prior("ldm", "cpu").name == "shipped"
    with pytest.raises(InputError, match="needs a vdm prior"):
        store.load_prior("mine", kind="vdm")


def test_list_shows_installed_and_the_missing_published_prior(roots):
    user, bundled = roots
    _write(bundled, "shipped")
    os.makedirs(user / "broken")
    (user / "broken" / "model.json").write_text("{not json")
    rows = {r["name"]: r for r in store.list_models()}
    assert rows["shipped"]["status"] == "installed" and rows["shipped"]["source"] == "bundled"
    assert rows["broken"]["status"] == "broken" and "Cannot read" in rows["broken"]["error"]
    pub = rows[ukbb.NAME]
    assert pub["status"] == "not installed" and "models import" in pub["install"]
    assert any("329e97b3085643ff235f11f049856242" in f for f in pub["files"])
    assert pub["store"] == str(user)


@pytest.mark.parametrize("raw,want", [("My Prior", "my-prior"), ("../../etc", "etc"), ("a/b\\c", "a-b-c"),
                                      (".hidden", "hidden"), ("x" * 80, "x" * 64)])
def test_sanitise_name(raw, want):
    assert cards.sanitise_name(raw) == want


def test_prior_moves_between_devices(roots, device):
    _write(roots[0], "p")
    prior = store.load_prior("p", device)
    assert prior.device.type == torch.device(device).type


def test_published_card_is_valid_and_its_defaults_fit_the_methods():
    from MRISuperResLib.methods import get_method

    c = ukbb.card()
    cards.check_card(c, "ukbb")
    for method in ("inversesr-decoder", "inversesr-ldm"):
        for dev in ("cpu", "cuda"):
            s = get_method(method).resolve_settings(None, cards.method_defaults(c, method, dev))
            assert s["iterations"] == 601 and s["lr"] == 0.07
    assert get_method("inversesr-ldm").resolve_settings(None, cards.method_defaults(c, "inversesr-ldm", "cpu"))[
        "ddim_steps"] == 46
    assert c["latent"]["shape"] == [3, 20, 28, 20] and c["grid"]["shape"] == [160, 224, 160]
