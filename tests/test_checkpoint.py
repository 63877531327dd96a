"""Checkpoints cross both ways with transformers; bad folders and failed saves give clear outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_batch, oracle_model, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Model, checkpoint

CONFIG = tiny_config_dict(sliding_window=8)
TIED = tiny_config_dict(tie=True)


def real_logits(model, batch):  # noqa: ANN001, ANN201
    with torch.no_grad():
        return model(**batch).logits[batch["attention_mask"].bool()]


@pytest.mark.oracle
@pytest.mark.parametrize("config", [CONFIG, TIED], ids=["untied", "tied"])
def test_sharded_checkpoint_written_by_transformers_loads_with_the_same_logits(tmp_path: Path, config) -> None:  # noqa: ANN001
    reference = oracle_model(config)
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    batch = make_batch(config)
    torch.testing.assert_close(real_logits(ours, batch), real_logits(reference, batch), rtol=0, atol=1e-4)
    if config["tie_word_embeddings"]:
        assert ours.lm_head.weight is ours.model.text_model.embed_tokens.weight


@pytest.mark.oracle
@pytest.mark.parametrize("config", [CONFIG, TIED], ids=["untied", "tied"])
def test_checkpoint_we_write_loads_in_transformers_with_the_same_logits(tmp_path: Path, config) -> None:  # noqa: ANN001
    transformers = pytest.importorskip("transformers")
    ours = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config))
    ours.load_state_dict(oracle_model(config, seed=5).state_dict())
    ours.save_pretrained(tmp_path, max_shard_size="50KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) != config["tie_word_embeddings"]
    theirs = transformers.Idefics2ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="eager")
    batch = make_batch(config)
    torch.testing.assert_close(real_logits(theirs.eval(), batch), real_logits(ours.eval(), batch), rtol=0, atol=1e-4)


@pytest.mark.oracle
def test_headless_model_loads_a_conditional_generation_checkpoint(tmp_path: Path) -> None:
    reference = oracle_model(CONFIG)
    reference.save_pretrained(tmp_path)
    ours = Idefics2Model.from_pretrained(tmp_path)
    batch = make_batch(CONFIG)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = reference.model(**batch).last_hidden_state[real]
        torch.testing.assert_close(ours(**batch).last_hidden_state[real], expected, rtol=0, atol=1e-4)


def test_dtype_and_torch_dtype_alias_convert_on_load(tmp_path: Path) -> None:
    Idefics2ForConditionalGeneration(Idefics2Config.from_dict(CONFIG)).save_pretrained(tmp_path)
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": "bfloat16"}):
        model = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, **kwargs)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert not model.training


def _saved(tmp_path: Path, config: dict = CONFIG) -> Path:  # noqa: FA100
    folder = tmp_path / "ckpt"
    Idefics2ForConditionalGeneration(Idefics2Config.from_dict(config)).save_pretrained(folder)
    return folder


def test_missing_unexpected_and_mis_shaped_keys_are_listed(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _saved(tmp_path)
    state = load_file(folder / "model.safetensors")
    state.pop("model.connector.perceiver_resampler.latents")
    state["model.vision_model.head.probe"] = torch.zeros(2)
    state["lm_head.weight"] = torch.zeros(7, 48)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError) as err:
        Idefics2ForConditionalGeneration.from_pretrained(folder)
    message = str(err.value)
    assert "missing keys (1): ['model.connector.perceiver_resampler.latents']" in message
    assert "unexpected keys (1): ['model.vision_model.head.probe']" in message
    assert "lm_head.weight: checkpoint (7, 48), model (120, 48)" in message


def test_pickle_checkpoints_are_refused_with_an_explanation(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*safetensors only"):
        Idefics2ForConditionalGeneration.from_pretrained(folder)


def test_a_repo_id_is_read_from_the_cache_and_downloaded_only_when_allowed(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    folder = _saved(tmp_path)
    calls: list[dict[str, object]] = []

    def hub(repo_id: str, *, cached: bool, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        if kwargs.get("local_files_only") and not cached:
            raise OSError("not in the cache")
        return str(folder)

    monkeypatch.delenv("IDEFICS2_ALLOW_DOWNLOADS", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda r, **k: hub(r, cached=False, **k))
    with pytest.raises(ValueError, match=r"'runs/ft' is not a local folder, nor a Hub repo in the Hugging Face "
                                         r"cache.*allow_download=True.*check the path"):
        Idefics2ForConditionalGeneration.from_pretrained("runs/ft")  # the README's fine-tune folder, mistyped
    assert [c.get("local_files_only") for c in calls] == [True]  # the cache was asked, the network never
    monkeypatch.setenv("IDEFICS2_ALLOW_DOWNLOADS", "1")
    assert Idefics2ForConditionalGeneration.from_pretrained("org/name").config is not None
    assert calls[-1].get("local_files_only") is None  # downloaded, as allowed
    monkeypatch.delenv("IDEFICS2_ALLOW_DOWNLOADS")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda r, **k: hub(r, cached=True, **k))
    Idefics2ForConditionalGeneration.from_pretrained("HuggingFaceM4/idefics2-8b")  # cached: no permission needed
    with pytest.raises(ValueError, match=r"is not a folder"):
        Idefics2ForConditionalGeneration.from_pretrained("./no/such/folder/here")


def test_a_failed_save_leaves_the_previous_checkpoint_and_other_files_intact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _saved(tmp_path)
    (folder / "tokenizer.json").write_text("{}")
    before = (folder / "model.safetensors").read_bytes()
    other = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(CONFIG))
    calls = []

    def failing_save_file(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(args[1])
        if len(calls) == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    original = checkpoint.save_file
    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(folder, max_shard_size="50KB")
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folder left behind
    monkeypatch.undo()
    other.save_pretrained(folder, max_shard_size="50KB")  # a successful save replaces the weights...
    assert not (folder / "model.safetensors").exists() and (folder / "model.safetensors.index.json").exists()
    assert (folder / "tokenizer.json").read_text() == "{}"  # ...and keeps the tokenizer saved beside them


@pytest.mark.parametrize("size, expected", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("40KB", 40_000), (123, 123)])
def test_shard_sizes_parse_like_transformers(size, expected: int) -> None:  # noqa: ANN001
    assert checkpoint.parse_size(size) == expected


def test_an_unparseable_shard_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_shard_size '5 gigs' is not a size"):
        checkpoint.parse_size("5 gigs")


def test_saved_checkpoints_get_ordinary_permissions_not_private_temp_ones(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        folder = _saved(tmp_path)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in folder.iterdir()} == {0o644}


def test_generation_defaults_travel_with_the_checkpoint(tmp_path: Path) -> None:
    from idefics2.generation.config import GenerationConfig

    model = Idefics2ForConditionalGeneration(Idefics2Config.from_dict(CONFIG))
    model.generation_config = GenerationConfig(max_new_tokens=7, eos_token_id=[2, 5])
    model.save_pretrained(tmp_path)
    loaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.generation_config.max_new_tokens == 7 and loaded.generation_config.eos_token_id == [2, 5]
    (tmp_path / "generation_config.json").unlink()
    derived = Idefics2ForConditionalGeneration.from_pretrained(tmp_path).generation_config  # from config.json
    assert derived.eos_token_id == 2 and derived.max_new_tokens is None


@pytest.mark.oracle
def test_from_pretrained_with_config_and_state_dict_like_transformers(tmp_path: Path) -> None:
    """from_pretrained(None, config=..., state_dict=...) and output_loading_info=True failed before."""
    reference = oracle_model(TIED)
    config = Idefics2Config.from_dict(TIED)
    ours, info = Idefics2ForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=reference.state_dict(), output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    batch = make_batch(TIED)
    torch.testing.assert_close(real_logits(ours, batch), real_logits(reference, batch), rtol=0, atol=1e-4)
    state = reference.state_dict()
    assert all(p.data_ptr() != state[name].data_ptr() for name, p in ours.named_parameters())  # own copies
    headless = Idefics2Model.from_pretrained(None, config=config, state_dict=state)  # "model." prefixes dropped
    assert torch.equal(headless.text_model.norm.weight, state["model.text_model.norm.weight"])
    broken = {k: v for k, v in state.items() if "latents" not in k}
    with pytest.raises(ValueError, match=r"state_dict does not fit the model(.|\n)*missing keys \(3\)"):
        Idefics2ForConditionalGeneration.from_pretrained(None, config=config, state_dict=broken)
    with pytest.raises(ValueError, match="needs both config= and state_dict="):
        Idefics2ForConditionalGeneration.from_pretrained(None, config=config)
    # a folder's weights under a config given in code
    reference.save_pretrained(tmp_path)
    other = Idefics2Config.from_dict(TIED)
    other.use_cache = False
    loaded = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, config=other)
    assert loaded.config is other


def test_output_loading_info_loads_leniently_as_transformers(tmp_path: Path) -> None:
    """Asked for the loading info, a headless checkpoint loads into the generation class with the
    head initialised and reported, as transformers does; without it, the same folder is refused."""
    transformers = pytest.importorskip("transformers")
    base = Idefics2Model(Idefics2Config.from_dict(CONFIG))
    base.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['lm_head.weight'\]"):
        Idefics2ForConditionalGeneration.from_pretrained(tmp_path)
    model, info = Idefics2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    _, expected = transformers.Idefics2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == sorted(expected["missing_keys"]) == ["lm_head.weight"]
    head = model.lm_head.weight
    assert not head.is_meta and 0.005 < float(head.std()) < 0.05 and float(head.mean().abs()) < 0.01
    torch.testing.assert_close(model.model.text_model.embed_tokens.weight, base.text_model.embed_tokens.weight)
