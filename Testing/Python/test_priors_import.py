"""`models import`: the old monai-generative layout converted for real, bundles, zips, checksums, safety."""

import json
import os
import zipfile

import pytest
import torch
from conftest import assert_same_to_float32_rounding

from MRISuperResLib.cli import main
from MRISuperResLib.errors import InputError
from MRISuperResLib.priors import folder as folders
from MRISuperResLib.priors import store, synthetic
from MRISuperResLib.priors.importer import import_model, remove_model

old_nets = pytest.importorskip("generative.networks.nets")  # monai-generative 0.2.3, installed with --no-deps




@pytest.fixture(autouse=True)
def user_store(tmp_path, monkeypatch):
    monkeypatch.setenv(store.ENV_VAR, str(tmp_path / "store"))
    monkeypatch.setattr(store, "bundled_dirs", lambda: [])
    return tmp_path / "store"


def _old_kwargs(kwargs):
    k = dict(kwargs)
    k["num_channels"] = tuple(k.pop("channels"))
    return {a: tuple(v) if isinstance(v, list) else v for a, v in k.items()}


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory):
    """A bundle folder laid out like the published one, holding random old-layout weights of a narrow topology."""
    card = synthetic.tiny_card(name="tiny-published")
    torch.manual_seed(0)
    ae = old_nets.AutoencoderKL(**_old_kwargs(card["networks"]["autoencoder"]["kwargs"])).eval()
    unet = old_nets.DiffusionModelUNet(**_old_kwargs(card["networks"]["unet"]["kwargs"])).eval()
    with torch.no_grad():
        for p in unet.parameters():  # the old code zero-initialises outputs too; make every weight matter
            p.add_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("bundle") / "brain_image_synthesis_latent_diffusion_model"
    (root / "models").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "scripts").mkdir()
    marker = root.parent / "EXECUTED"
    (root / "scripts" / "__init__.py").write_text("open(%r, 'w').write('x')\n" % str(marker))
    (root / "configs" / "inference.json").write_text(json.dumps({"run": "$__import__('os').system('touch %s')"
                                                                 % marker}))
    torch.save(ae.state_dict(), str(root / "models" / "autoencoder.pt"))
    torch.save(unet.state_dict(), str(root / "models" / "model.pt"))
    md5 = {"autoencoder": folders.file_digest(str(root / "models" / "autoencoder.pt"), "md5"),
           "unet": folders.file_digest(str(root / "models" / "model.pt"), "md5")}
    return {"root": root, "card": card, "md5": md5, "ae": ae, "unet": unet, "marker": marker}


def _same_outputs(prior, old):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 3, 8, 8, 8, generator=g)
    x = torch.randn(1, 7, 8, 8, 8, generator=g)
    t, ctx = torch.tensor([321]), torch.rand(1, 1, 4, generator=g)
    with torch.no_grad():
        assert torch.equal(prior.autoencoder.decode(z), old["ae"].decode(z))
        # fused attention (the store's build) against monai-generative's explicit attention
        assert_same_to_float32_rounding(prior.unet(x, t, context=ctx), old["unet"](x, t, context=ctx))
        assert prior.unet(x, t, context=ctx).abs().max() > 1e-3


def test_old_layout_differs_and_is_converted(old_bundle):
    new_unet = folders.build(old_bundle["card"]["networks"]["unet"], device="meta")
    assert set(old_bundle["unet"].state_dict()) != set(new_unet.state_dict())  # the conversion is exercised
    card = import_model([str(old_bundle["root"])], published_card=old_bundle["card"], published_md5=old_bundle["md5"])
    assert card["name"] == "tiny-published"
    prior = store.load_prior("tiny-published")
    _same_outputs(prior, old_bundle)
    assert not old_bundle["marker"].exists()  # bundle configs and scripts were never run
    folder = store.find_prior("tiny-published")
    assert sorted(os.listdir(folder)) == ["autoencoder.safetensors", "model.json", "unet.safetensors"]
    for spec in card["networks"].values():
        assert spec["sha256"] == folders.file_digest(os.path.join(folder, spec["weights"]))


def test_two_files_and_zip(old_bundle, tmp_path):
    models = old_bundle["root"] / "models"
    import_model([str(models / "model.pt"), str(models / "autoencoder.pt")], name="from-files",
                 published_card=old_bundle["card"], published_md5=old_bundle["md5"])
    _same_outputs(store.load_prior("from-files"), old_bundle)
    zpath = tmp_path / "bundle.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in old_bundle["root"].rglob("*"):
            zf.write(f, str(f.relative_to(old_bundle["root"].parent)))
    import_model([str(zpath)], name="from-zip", published_card=old_bundle["card"], published_md5=old_bundle["md5"])
    _same_outputs(store.load_prior("from-zip"), old_bundle)


def test_md5_mismatch_is_refused(old_bundle, user_store):
    bad = dict(old_bundle["md5"], unet="0" * 32)
    with pytest.raises(InputError, match="md5"):
        import_model([str(old_bundle["root"])], published_card=old_bundle["card"], published_md5=bad)
    assert not (user_store / "tiny-published").exists()
    import_model([str(old_bundle["root"])], published_card=old_bundle["card"], published_md5=bad,
                 allow_unverified=True)
    assert (user_store / "tiny-published" / "model.json").exists()


def test_the_published_md5_is_checked_by_default(old_bundle):
    with pytest.raises(InputError, match="329e97b3085643ff235f11f049856242|21c3047556fb671caf0556f1cce6ef22"):
        import_model([str(old_bundle["root"])], published_card=old_bundle["card"])


@pytest.mark.parametrize("entry", ["../escape.pt", "/abs/model.json", "a/../../b.pt", "C:/x/model.pt"])
def test_zip_entries_that_escape_are_refused(tmp_path, entry, user_store):
    zpath = tmp_path / "evil.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("ok/model.json", "{}")
        zf.writestr(entry, b"x")
    with pytest.raises(InputError, match="outside its folder"):
        import_model([str(zpath)])
    assert not (tmp_path / "escape.pt").exists()
    assert not any(p.name != ".keep" for p in user_store.iterdir() if not p.name.startswith(".import-"))


def test_our_format_names_remove_and_duplicates(tmp_path, user_store):
    src = synthetic.write_prior(synthetic.random_prior(synthetic.tiny_card(name="orig")), str(tmp_path / "src"))
    for bad in ("../My Prior!!", "../../evil", "My-Prior"):  # a name the user chose is refused, never rewritten
        with pytest.raises(InputError, match="cannot be used as a model name") as exc:
            import_model([src], name=bad)
        assert "letters, digits" in exc.value.fix
    assert not (tmp_path / "evil").exists() and not (user_store / "evil").exists()
    card = import_model([src], name="my-prior")
    assert card["name"] == "my-prior"
    assert (user_store / "my-prior" / "model.json").exists() and not (tmp_path / "My Prior!!").exists()
    with pytest.raises(InputError, match="already installed"):
        import_model([src], name="my-prior")
    with pytest.raises(InputError, match="cannot be used as a model name"):
        import_model([src], name="../..")
    assert remove_model("my-prior").endswith("my-prior")
    assert not (user_store / "my-prior").exists()
    with pytest.raises(InputError, match="No prior named"):
        remove_model("my-prior")


def test_cli_import_list_remove(old_bundle, capsys, user_store, monkeypatch):
    monkeypatch.setattr("MRISuperResLib.priors.ukbb.CARD", old_bundle["card"])
    monkeypatch.setattr("MRISuperResLib.priors.ukbb.WEIGHT_FILES", {
        "autoencoder": (("autoencoder.pt",), old_bundle["md5"]["autoencoder"], "1 kB"),
        "unet": (("model.pt",), old_bundle["md5"]["unet"], "1 kB")})
    assert main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    assert [r["status"] for r in rows] == ["not installed"]
    assert main(["models", "import", str(old_bundle["root"]), "--name", "cli-prior"]) == 0
    assert capsys.readouterr().out.strip() == "cli-prior"
    assert main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["models"]}
    assert rows["cli-prior"]["status"] == "installed" and rows["cli-prior"]["source"] == "user"
    assert main(["models", "import", str(user_store / "nothing-here")]) == 2
    assert main(["models", "remove", "cli-prior"]) == 0
    assert main(["models", "remove", "cli-prior"]) == 2


def test_monai_core_layout_files(tmp_path):
    card = synthetic.tiny_card(name="core-layout")
    prior = synthetic.random_prior(card, seed=4)
    paths = [str(tmp_path / "autoencoder.pth"), str(tmp_path / "diffusion_model.pth")]
    torch.save(prior.autoencoder.state_dict(), paths[0])
    torch.save(prior.unet.state_dict(), paths[1])
    md5 = {"autoencoder": folders.file_digest(paths[0], "md5"), "unet": folders.file_digest(paths[1], "md5")}
    import_model(paths, published_card=card, published_md5=md5)
    got = store.load_prior("core-layout")
    z, x = torch.randn(1, 3, 8, 8, 8), torch.randn(1, 7, 8, 8, 8)
    t, ctx = torch.tensor([10]), torch.rand(1, 1, 4)
    with torch.no_grad():
        assert torch.equal(got.autoencoder.decode(z), prior.autoencoder.decode(z))
        # the store builds attention fused, like random_prior; the two kernels may still sum in other orders
        assert_same_to_float32_rounding(got.unet(x, t, context=ctx), prior.unet(x, t, context=ctx))
    with pytest.raises(InputError, match="Cannot tell which network"):
        import_model([paths[0], str(tmp_path / "autoencoder.pth")], published_card=card, published_md5=md5)
