"""IDGBRModel contract on the tiny preset: shapes, save/load, drop, fast failure for a missing SD-1.5 path."""

import time

import pytest
import torch

from idgbr.nn.config import RefinerConfig
from idgbr.errors import IdgbrError
from idgbr.nn.model import IDGBRModel

torch.set_num_threads(1)  # the CI/dev box is small and shared: avoid thread oversubscription


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = RefinerConfig.preset_config("tiny", num_classes=4)
    model = IDGBRModel(config).eval()
    # make the CG modules non-trivial so drop / save-load comparisons mean something
    with torch.no_grad():
        for module in model.guidance.cg:
            module.fuse.weight.normal_(0, 0.1)
            module.proj.weight.normal_(0, 0.1)
    return model


def _inputs(model, batch=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, model.config.num_classes, (batch, size, size), generator=g)
    coarse = torch.randint(0, model.config.num_classes, (batch, size, size), generator=g)
    return image, labels, coarse


def test_contract_shapes(tiny):
    image, labels, coarse = _inputs(tiny)
    x = tiny.normalize_image(image)
    assert x.min() >= -1 and x.max() <= 1
    z_img = tiny.encode_image(x)
    z_lbl = tiny.encode_labels(labels)
    assert z_img.shape == (2, 3 * 16, 8, 8) and z_lbl.shape == (2, 48, 8, 8)
    cond = tiny.condition(z_img, tiny.encode_labels(coarse))
    t = torch.tensor([10, 900])
    pred, aux = tiny(z_lbl, t, cond, return_aux=True)
    assert pred.shape == z_lbl.shape
    assert aux["repa"].shape == (2, 16, 4, 4)
    logits = tiny.decode_logits(pred)
    assert logits.shape == (2, 4, 32, 32)
    # soft labels (one-hot) give the same latent as hard labels
    onehot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(tiny.encode_labels(onehot), z_lbl)
    # batch-1 condition broadcasts
    pred1 = tiny(z_lbl, t, cond[:1])
    pred_ref = tiny(z_lbl, t, type(cond)([f[:1].expand(2, -1, -1, -1) for f in cond.levels]))
    torch.testing.assert_close(pred1, pred_ref)
    sched = tiny.make_scheduler()
    assert sched.config.prediction_type == tiny.config.prediction_type
    assert sched.config.timestep_spacing == tiny.config.timestep_spacing == "trailing"


def test_drop_equals_zero_residuals(tiny):
    image, labels, coarse = _inputs(tiny)
    z_lbl = tiny.encode_labels(labels)
    cond = tiny.condition(tiny.encode_image(tiny.normalize_image(image)), tiny.encode_labels(coarse))
    t = torch.tensor([500, 500])
    with torch.no_grad():
        dropped = tiny(z_lbl, t, cond, drop=torch.tensor([True, True]))
        kept = tiny(z_lbl, t, cond)
        plain = tiny.unet(z_lbl, t, tiny.context.expand(2, -1, -1)).sample  # no residuals at all
        half = tiny(z_lbl, t, cond, drop=torch.tensor([True, False]))
    torch.testing.assert_close(dropped, plain, atol=1e-5, rtol=1e-5)
    assert (dropped - kept).abs().max() > 1e-4
    torch.testing.assert_close(half[0], dropped[0])
    torch.testing.assert_close(half[1], kept[1])


def test_save_load_identical(tiny, tmp_path):
    image, labels, coarse = _inputs(tiny)
    tiny.save_pretrained(tmp_path / "run")
    loaded = IDGBRModel.from_pretrained(tmp_path / "run").eval()
    assert not list(tmp_path.glob("run/*.bin")) and not list(tmp_path.glob("run/*.pt"))
    with torch.no_grad():
        outs = []
        for m in (tiny, loaded):
            z = m.encode_labels(labels)
            cond = m.condition(m.encode_image(m.normalize_image(image)), m.encode_labels(coarse))
            outs.append(m.decode_logits(m(z, torch.tensor([3, 700]), cond)))
    assert torch.equal(outs[0], outs[1])


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(IdgbrError, match="model.safetensors"):
        IDGBRModel.from_pretrained(tmp_path)


def test_sd15_missing_path_fails_fast():
    start = time.perf_counter()
    with pytest.raises(IdgbrError, match="/nonexistent/sd15"):
        IDGBRModel(RefinerConfig.preset_config("sd15", pretrained="/nonexistent/sd15"))
    assert time.perf_counter() - start < 1.0


def test_sd15_incomplete_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    with pytest.raises(IdgbrError, match="vae/config.json"):
        IDGBRModel(RefinerConfig.preset_config("sd15", pretrained=str(tmp_path)))


# (total, trainable) per part for the presets' defaults (6 classes, 3 bands); pinned so that a change to the
# architecture shows up here. Re-pin deliberately when a preset's geometry changes.
PARAMETER_COUNTS = {
    "tiny": {"label_embed": (184, 0), "codec": (0, 0), "unet": (70152, 70152), "guidance_encoder": (36416, 36416),
             "cg_modules": (6968, 6968), "context": (8, 8), "total": (113728, 113544)},
    # lite reads the image with ImageNet EfficientNet-Lite0 cut at stride 16 (0.70 M) and its 1x1 projections; the
    # last 2 blocks and the projections train (issue 21). With image_encoder="copy": guidance_encoder (193184,
    # 193184) and total (965576, 964272).
    "lite": {"label_embed": (1304, 0), "codec": (0, 0), "unet": (555008, 555008), "guidance_encoder": (186256, 186256),
             "cg_modules": (216048, 216048), "image_encoder": (721616, 666112), "context": (32, 32),
             "total": (1680264, 1623456)},
}


@pytest.mark.parametrize("preset", ["tiny", "lite"])
def test_parameter_counts(preset):
    model = IDGBRModel(RefinerConfig.preset_config(preset))
    counts = model.parameter_counts()
    assert counts == PARAMETER_COUNTS[preset]
    # the parts partition the model: every parameter counted once, in the part it belongs to
    assert counts["total"][0] == sum(p.numel() for p in model.parameters())
    assert counts["total"][1] == sum(p.numel() for p in model.trainable_parameters())
    assert counts["unet"][0] == sum(p.numel() for p in model.unet.parameters())
    assert counts["cg_modules"][0] == sum(p.numel() for p in model.guidance.cg.parameters())
    assert counts["label_embed"][1] == 0 and counts["codec"] == (0, 0)
    assert counts["guidance_encoder"][1] == counts["guidance_encoder"][0] > 0  # trainable in lite/tiny


def test_attention_free_unet_and_guidance_attention_on_coarse_levels_only(tmp_path):
    """The fast geometry switches: no transformer blocks anywhere (UNet and its guidance-encoder copy), CG
    cross-attention only at levels with stride >= 2; it runs, trains its fusion everywhere and round-trips."""
    from idgbr.nn import unet_parts

    torch.manual_seed(0)
    config = RefinerConfig.preset_config(
        "tiny", num_classes=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D", guidance_attention_stride=2)
    model = IDGBRModel(config).eval()
    assert not [n for n, m in model.named_modules() if type(m).__name__ in ("Transformer2DModel", "Attention")
                and not n.startswith("guidance.cg")]
    strides = unet_parts.level_strides(model.unet)
    assert [m.mode for m in model.guidance.cg] == ["live" if s >= 2 else "none" for s in strides]
    assert {m.mode for m in model.guidance.cg} == {"live", "none"}
    default = IDGBRModel(RefinerConfig.preset_config("tiny", num_classes=4))
    assert {m.mode for m in default.guidance.cg} == {"live"}
    with torch.no_grad():
        for module in model.guidance.cg:
            module.fuse.weight.normal_(0, 0.1)
            if module.mode != "none":
                module.proj.weight.normal_(0, 0.1)
    image, labels, coarse = _inputs(model)
    model.save_pretrained(tmp_path / "run")
    loaded = IDGBRModel.from_pretrained(tmp_path / "run").eval()
    assert loaded.config.mid_block_type == "UNetMidBlock2D" and loaded.config.guidance_attention_stride == 2
    with torch.no_grad():
        outs = []
        for m in (model, loaded):
            cond = m.condition(m.encode_image(m.normalize_image(image)), m.encode_labels(coarse))
            outs.append(m(m.encode_labels(labels), torch.tensor([3, 700]), cond))
    assert outs[0].shape == (2, 48, 8, 8) and torch.equal(outs[0], outs[1])
    with pytest.raises(IdgbrError, match="guidance_attention_stride"):
        RefinerConfig.preset_config("tiny", guidance_attention_stride=0)


def test_boundary_map_is_the_square_window_test():
    """boundary_map (separable max pools, for speed) marks exactly the pixels whose (2w+1)² window holds another
    label, at the image edges too."""
    import torch.nn.functional as F

    from idgbr.nn.model import boundary_map

    torch.manual_seed(0)
    labels = torch.randint(0, 4, (2, 37, 53))
    labels[:, :10] = 2
    for width in (1, 3, 4):
        x = labels[:, None].float()
        size = 2 * width + 1
        square = (F.max_pool2d(x, size, 1, width) != -F.max_pool2d(-x, size, 1, width))[:, 0]
        assert torch.equal(boundary_map(labels, width), square)
    one = torch.zeros(1, 9, 9, dtype=torch.long)
    one[0, 4, 4] = 1
    assert boundary_map(one, 2)[0].sum() == 25  # the 5x5 window around the odd pixel
