"""Export layout and atomicity, manifest verification, and the standard-checkpoint contract of decoder/."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import signal
from qwen_audio_edge.runtime.artifacts import FORMAT_VERSION, MANIFEST, load_manifest
from qwen_audio_edge.runtime.errors import ArtifactsError, CheckpointError, OptionsError


def test_checkpoint_fixture_has_the_real_layout(mha):
    names = {p.name for p in mha.checkpoint.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "chat_template.json",
    } <= names
    index = json.loads((mha.checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # sharded
    prefixes = {k.split(".")[0] for k in index["weight_map"]}
    assert prefixes == {"audio_tower", "multi_modal_projector", "language_model"}
    tok = json.loads((mha.checkpoint / "tokenizer.json").read_text())
    added = {t["content"] for t in tok["added_tokens"]}
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"} <= added


def test_artifacts_layout_and_manifest(mha):
    art = load_manifest(mha.artifacts)
    m = art.manifest
    assert m["format_version"] == FORMAT_VERSION
    for rel in (
        "encoder.onnx",
        "tokenizer.json",
        "chat_template.jinja",
        "mel_filters.safetensors",
        "preprocessor_config.json",
        "decoder/config.json",
    ):
        assert rel in m["files"] and len(m["files"][rel]["sha256"]) == 64
    assert m["config"]["text"]["num_key_value_heads"] == 4
    assert m["tools"]["transformers"] and m["tools"]["torch"]
    assert not list(mha.artifacts.parent.glob(".artifacts.partial-*"))


def test_decoder_folder_is_a_standard_qwen2_checkpoint(mha, pipelines):
    from transformers import Qwen2ForCausalLM

    ref = Qwen2ForCausalLM.from_pretrained(str(mha.artifacts / "decoder"), dtype=torch.float32).eval()
    p = pipelines(mha)
    ids = torch.tensor([[3, 50, 100, 7, 250, 11]])
    with torch.no_grad():
        expected = ref(ids).logits[0]
        cache = p.decoder.setup_cache(16)
        ours = p.decoder(p.decoder.embed(ids), 0, cache, all_logits=True)[0]
    # measured 0 (the same fp32 ops in the same order); bound 1e-5 × max (room for another torch build's order)
    assert (ours - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_fp16_encoder_and_torch_backend(mha_fp16, mha, pipelines):
    wave = signal(6.1, loud_end=True)
    p32 = pipelines(mha)
    mel, n = p32.mel.log_mel(wave)
    ref = p32.encoder(mel, n)
    torch_backend = pipelines(mha, encoder_backend="torch").encoder(mel, n)
    assert (torch_backend - ref).abs().max().item() <= 1e-5  # measured 1.8e-6 (outputs reach |4|); margin 5×
    p16 = pipelines(mha_fp16)  # default encoder of this export: fp16
    half = p16.encoder(mel, n)
    full = pipelines(mha_fp16, encoder_precision="fp32").encoder(mel, n)
    cos = torch.nn.functional.cosine_similarity(half, full, dim=-1)
    assert 1 - cos.min().item() <= 5e-6  # measured 5.4e-7; bound 5e-6 (margin 10×)


def _copy(art, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    return dst


def test_manifest_errors_name_the_file(mha, tmp_path):
    with pytest.raises(ArtifactsError, match="not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ArtifactsError, match=r"no manifest\.json"):
        load_manifest(tmp_path)
    art = _copy(mha.artifacts, tmp_path)
    (art / "tokenizer.json").unlink()
    with pytest.raises(ArtifactsError, match=r"missing: tokenizer\.json"):
        load_manifest(art)
    shutil.rmtree(art)

    art = _copy(mha.artifacts, tmp_path)
    data = bytearray((art / "chat_template.jinja").read_bytes())
    data[0] ^= 1
    (art / "chat_template.jinja").write_bytes(bytes(data))
    with pytest.raises(ArtifactsError, match=r"chat_template\.jinja fails its sha256"):
        load_manifest(art)
    load_manifest(art, verify_hashes=False)  # sizes still match: --no-verify accepts it
    with open(art / "encoder.onnx", "ab") as f:
        f.write(b"x")
    with pytest.raises(ArtifactsError, match=r"encoder\.onnx has .* bytes"):
        load_manifest(art, verify_hashes=False)
    shutil.rmtree(art)

    art = _copy(mha.artifacts, tmp_path)
    m = json.loads((art / MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactsError, match="format version 2, this runtime reads version 1"):
        load_manifest(art)
    (art / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactsError, match="not valid JSON"):
        load_manifest(art)


def test_export_refuses_overwrite_and_force_replaces(mha, tmp_path):
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint

    out = tmp_path / "out"
    export_checkpoint(mha.checkpoint, out, ExportOptions(progress=False))
    (out / "keep.txt").write_text("stale file from an earlier export")
    with pytest.raises(OptionsError, match="--force"):
        export_checkpoint(mha.checkpoint, out, ExportOptions(progress=False))
    assert (out / "keep.txt").exists()
    export_checkpoint(mha.checkpoint, out, ExportOptions(progress=False, force=True))
    assert not (out / "keep.txt").exists() and (out / MANIFEST).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_export_leaves_nothing_that_looks_valid(mha, tmp_path, monkeypatch):
    from qwen_audio_edge.export import package

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        package.export_checkpoint(mha.checkpoint, tmp_path / "out", package.ExportOptions(progress=False))
    assert list(tmp_path.iterdir()) == []


def test_bad_checkpoints_are_rejected(tmp_path, mha):
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint

    with pytest.raises(CheckpointError, match="not found"):
        export_checkpoint(tmp_path / "missing", tmp_path / "o1", ExportOptions(progress=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        export_checkpoint(tmp_path / "empty", tmp_path / "o2", ExportOptions(progress=False))
    bad = tmp_path / "bad"
    shutil.copytree(mha.checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="expected 'qwen2_audio'"):
        export_checkpoint(bad, tmp_path / "o3", ExportOptions(progress=False))
    cfg["model_type"] = "qwen2_audio"
    (bad / "config.json").write_text(json.dumps(cfg))
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name} listed in the index is missing"):
        export_checkpoint(bad, tmp_path / "o4", ExportOptions(progress=False))
    assert not (tmp_path / "o4").exists()
    with pytest.raises(OptionsError, match="--bits 8"):
        ExportOptions(bits=8)


def test_force_never_replaces_a_directory_that_is_not_artifacts(mha, tmp_path):
    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint

    precious = tmp_path / "docs"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(OptionsError, match="not an artifacts directory"):
        export_checkpoint(mha.checkpoint, precious, ExportOptions(progress=False, force=True))
    assert (precious / "thesis.txt").read_text() == "do not delete"


def test_manifest_missing_sections_is_an_artifacts_error(mha, tmp_path):
    art = _copy(mha.artifacts, tmp_path)
    m = json.loads((art / MANIFEST).read_text())
    del m["files_role"]
    (art / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactsError, match="lacks files_role"):
        load_manifest(art)


def _rename_decoder_keys(src, dst, rename) -> None:
    """Copy a checkpoint with every decoder key renamed (rewriting shards and index)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(dst.glob("model-*.safetensors")):
        save_file({rename(k): v for k, v in load_file(str(shard)).items()}, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def test_both_decoder_key_forms_of_transformers_5_export_the_same_model(mha, pipelines, tmp_path):
    """transformers ≤ 5.17 saves `language_model.model.model.*`, later 5.x `language_model.model.*`:
    whichever this transformers wrote, the other form exports to the same tensors and tokens."""
    from safetensors.torch import load_file

    from qwen_audio_edge.export.package import ExportOptions, export_checkpoint

    index = json.loads((mha.checkpoint / "model.safetensors.index.json").read_text())
    doubled = any(k.startswith("language_model.model.model.") for k in index["weight_map"])
    if doubled:
        rename = lambda k: k.replace("language_model.model.model.", "language_model.model.", 1)
    else:
        rename = lambda k: k.replace("language_model.model.", "language_model.model.model.", 1)
    other = tmp_path / "other_form"
    _rename_decoder_keys(mha.checkpoint, other, rename)
    export_checkpoint(other, tmp_path / "art", ExportOptions(bits=32, progress=False))  # as the mha fixture
    mine, theirs = (
        load_file(str(mha.artifacts / "decoder" / "model.safetensors")),
        load_file(str(tmp_path / "art" / "decoder" / "model.safetensors")),
    )
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    from qwen_audio_edge.runtime.generate import SamplingOptions
    from qwen_audio_edge.runtime.pipeline import Pipeline

    wave, greedy = signal(2.0), SamplingOptions(max_new_tokens=8, greedy=True, ignore_eos=True)
    ref = pipelines(mha).run(wave, "What is said?", sampling=greedy).token_ids
    assert Pipeline.from_artifacts(tmp_path / "art").run(wave, "What is said?", sampling=greedy).token_ids == ref


@pytest.mark.parametrize(
    "key",
    [
        "language_model.model.model.model.norm.weight",
        "language_model.model.vision.weight",
        "audio_tower.extra.weight",
        "text_model.embed_tokens.weight",
    ],
)
def test_foreign_checkpoint_keys_are_refused_by_name(key):
    from qwen_audio_edge.export.checkpoint import map_key

    with pytest.raises(CheckpointError, match=f"unexpected tensor '{key}'.*Qwen2-Audio"):
        map_key(key)


def test_checkpoint_key_forms_map_to_runtime_names():
    from qwen_audio_edge.export.checkpoint import map_key

    for prefix in ("language_model.model.", "language_model.model.model.", "model.language_model."):
        assert map_key(prefix + "layers.3.mlp.up_proj.weight") == ("decoder", "model.layers.3.mlp.up_proj.weight")
    assert map_key("language_model.lm_head.weight") == ("decoder", "lm_head.weight")
    assert map_key("model.audio_tower.layers.0.fc1.bias") == ("encoder", "audio_tower.layers.0.fc1.bias")
    assert map_key("multi_modal_projector.linear.weight") == ("encoder", "multi_modal_projector.linear.weight")
