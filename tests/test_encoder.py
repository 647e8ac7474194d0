"""ClipEncoder: equality with open_clip, fingerprints, and the errors users meet offline."""

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from coder_index import ClipEncoder, ModelLoadError

from conftest import shared_path
from tiny_model import TINY_CONFIG


def descriptor_sentences(n: int) -> list[str]:
    data = json.loads(shared_path("data", "descriptors", "descriptors_imagenet.json").read_text())
    return [f"{c} which has {d}" for c, ds in data.items() for d in ds][:n]


def reference_text_embeddings(enc: ClipEncoder, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        ref = enc.model.encode_text(enc.tokenize(texts))
    return torch.nn.functional.normalize(ref, dim=-1).numpy()


def test_text_encoding_matches_open_clip_tiny(encoder):
    texts = descriptor_sentences(300) + ["x", "", "a photo of a cat."]
    fast = encoder.encode_texts(texts, batch_size=32)
    np.testing.assert_allclose(fast, reference_text_embeddings(encoder, texts), atol=1e-4)
    assert encoder._fast_text  # the truncated path was the one under test


def test_text_encoding_matches_open_clip_vit_b32_text_tower():
    enc = ClipEncoder("ViT-B-32", "random", device="cpu")
    with torch.no_grad():  # spread the random token embeddings so texts are far apart
        enc.model.token_embedding.weight.normal_(0, 1.0)
    texts = descriptor_sentences(96)
    fast = enc.encode_texts(texts, batch_size=32)
    ref = reference_text_embeddings(enc, texts)
    assert (fast @ fast.T).min() < 0.99  # embeddings differ far beyond the 1e-4 tolerance below
    np.testing.assert_allclose(fast, ref, atol=1e-4)


def test_image_encoding_matches_open_clip(encoder):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)) for i in range(5)]
    ours = encoder.encode_images(images, batch_size=2)
    with torch.no_grad():
        ref = encoder.model.encode_image(torch.stack([encoder.preprocess(im) for im in images]))
    np.testing.assert_allclose(ours, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-5)
    assert ours.shape == (5, encoder.embed_dim)


def test_fingerprint_is_stable_and_tracks_weights(tiny_model, other_tiny_model, encoder):
    again = ClipEncoder(tiny_model, device="cpu")
    other = ClipEncoder(other_tiny_model, device="cpu")
    assert again.fingerprint == encoder.fingerprint
    assert other.fingerprint.weights_sha256 != encoder.fingerprint.weights_sha256
    assert len(encoder.fingerprint.weights_sha256) == 64


def test_checkpoint_file_as_pretrained(tmp_path, tiny_model, encoder):
    # A built-in model name (registered like open_clip's own configs) with a local checkpoint file.
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "coder-tiny-test.json").write_text(json.dumps(TINY_CONFIG["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    weights = tiny_model[len("local-dir:"):] + "/open_clip_pytorch_model.bin"
    enc = ClipEncoder("coder-tiny-test", pretrained=weights, device="cpu")
    assert enc.fingerprint.weights_sha256 == encoder.fingerprint.weights_sha256
    assert enc.fingerprint.pretrained == weights


def test_local_dir_without_weights_is_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps(TINY_CONFIG))
    with pytest.raises(ModelLoadError, match="no weights file"):
        ClipEncoder(f"local-dir:{tmp_path}")


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(ModelLoadError, match="ViT-B-32"):
        ClipEncoder("ViT-B-33", "openai")


def test_unreachable_weights_explain_local_alternatives(monkeypatch):
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried: list[object] = []  # offline: refused without a single connection (nothing to wait for)
    real = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: (tried.append(addr), real(self, addr))[1])
    with pytest.raises(ModelLoadError) as err:
        ClipEncoder("ViT-B-32", "openai", device="cpu")
    msg = str(err.value)
    assert "--pretrained /path/to/" in msg and "local-dir:" in msg
    assert not tried, tried


def test_unknown_pretrained_tag_or_missing_file():
    with pytest.raises(ModelLoadError, match="neither a pretrained tag"):
        ClipEncoder("ViT-B-32", "/no/such/file.bin")


def test_random_weights_are_reproducible_across_loads(tmp_path):
    # An index built with --pretrained random must reopen in another process: same seeded weights.
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "coder-tiny-random.json").write_text(json.dumps(TINY_CONFIG["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    torch.manual_seed(123)
    a = ClipEncoder("coder-tiny-random", "random", device="cpu").fingerprint
    state = torch.random.get_rng_state()
    b = ClipEncoder("coder-tiny-random", "random", device="cpu").fingerprint
    assert a == b
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


def test_image_batches_larger_than_one_cpu_pass_match_open_clip(encoder):
    from coder_index.model.encoder import CPU_IMAGE_ROWS

    pixels = torch.from_numpy(np.random.default_rng(5).standard_normal((2 * CPU_IMAGE_ROWS + 5, 3, 32, 32),
                                                                       dtype=np.float32))
    ours = encoder.encode_image_batch(pixels)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(encoder.model.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert encoder.encode_image_batch(pixels[:0]).shape == (0, encoder.embed_dim)


def test_released_text_tower_frees_weights_and_comes_back_on_demand(tiny_model):
    enc = ClipEncoder(tiny_model, device="cpu")
    texts = descriptor_sentences(20)
    pixels = torch.from_numpy(np.random.default_rng(6).standard_normal((3, 3, 32, 32), dtype=np.float32))
    before_texts, before_images = enc.encode_texts(texts), enc.encode_image_batch(pixels)
    n_params = sum(p.numel() for p in enc.model.parameters())

    assert enc.release_text_tower() and enc.release_text_tower()  # twice is harmless
    left = sum(p.numel() for p in enc.model.parameters())
    visual = sum(p.numel() for p in enc.model.visual.parameters())
    assert left <= visual + 1 < n_params  # the image tower (and logit_scale) only
    np.testing.assert_array_equal(enc.encode_image_batch(pixels), before_images)

    np.testing.assert_array_equal(enc.encode_texts(texts), before_texts)  # loaded again, same weights
    assert sum(p.numel() for p in enc.model.parameters()) == n_params


def test_released_text_tower_refuses_weights_changed_on_disk(tmp_path, tiny_model, other_tiny_model):
    import shutil
    from pathlib import Path

    weights = "open_clip_pytorch_model.bin"
    local = tmp_path / "model"
    shutil.copytree(Path(tiny_model.removeprefix("local-dir:")), local)
    enc = ClipEncoder(f"local-dir:{local}", device="cpu")
    enc.release_text_tower()
    shutil.copy(Path(other_tiny_model.removeprefix("local-dir:")) / weights, local / weights)
    with pytest.raises(ModelLoadError, match="changed on disk"):
        enc.encode_texts(["a photo of a cat"])


def test_checkpoint_loads_skip_the_random_init_and_load_every_weight_exactly(tmp_path, tiny_model, encoder):
    """A model read from a checkpoint is built without initialising its weights (the file overwrites
    them all); every tensor equals the file's, the init functions work again afterwards, and a
    checkpoint that lacks a weight is refused rather than left uninitialised."""
    folder = tiny_model[len("local-dir:"):]
    saved = torch.load(f"{folder}/open_clip_pytorch_model.bin", weights_only=True)
    enc = ClipEncoder(tiny_model, device="cpu")
    got = enc.model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(got[name].float(), tensor.float()), name
    t = torch.zeros(1000)
    torch.nn.init.normal_(t)
    assert t.std() > 0.5  # torch.nn.init is itself again
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "coder-tiny-missing.json").write_text(json.dumps(TINY_CONFIG["model_cfg"]))
    open_clip.add_model_config(tmp_path / "cfgs")
    partial = {k: v for k, v in saved.items() if k != "ln_final.weight"}
    torch.save(partial, tmp_path / "partial.bin")
    with pytest.raises(ModelLoadError):
        ClipEncoder("coder-tiny-missing", pretrained=str(tmp_path / "partial.bin"), device="cpu")
