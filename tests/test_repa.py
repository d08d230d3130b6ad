"""REPA: projector init, teacher tokens from a tiny random Dinov2Model, loss masking, .pth mapping, errors."""

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from idgbr.errors import IdgbrError
from idgbr.nn.repa import Projector, load_dinov2, repa_loss, teacher_size, teacher_tokens

torch.set_num_threads(1)  # the CI/dev box is small and shared: avoid thread oversubscription


def _tiny_dinov2(swiglu=False):
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                          patch_size=14, image_size=56, use_swiglu_ffn=swiglu)
    return Dinov2Model(config).eval()


def test_projector_init():
    projector = Projector(8, 16, 12)
    linears = [m for m in projector.net if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in linears)
    assert projector(torch.randn(2, 5, 8)).shape == (2, 5, 12)


def test_teacher_tokens_and_loss():
    assert teacher_size(512) == 448 and teacher_size(64) == 56
    dino = _tiny_dinov2()
    teacher = teacher_tokens(dino, torch.randn(2, 3, 64, 64))
    assert teacher.shape == (2, 16, 16)  # 56 / 14 = 4 -> 16 tokens, CLS dropped
    projector = Projector(8, 16, 16)
    student = torch.randn(2, 8, 2, 2, requires_grad=True)
    loss = repa_loss(student, teacher, projector)
    assert -1 <= loss.item() <= 1
    loss.backward()
    assert student.grad.abs().sum() > 0
    # all-zero student (the CG output at init): every token masked, the loss is 0 and finite
    zero = repa_loss(torch.zeros(2, 8, 2, 2), teacher, Projector(8, 16, 16))
    assert zero.item() == 0.0
    # a student equal to the teacher direction gives -1
    identity = torch.nn.Identity()
    aligned = teacher.transpose(1, 2).reshape(2, 16, 4, 4) * 3
    assert repa_loss(aligned, teacher, identity).item() == pytest.approx(-1.0, abs=1e-5)


@pytest.mark.parametrize("swiglu", [False, True])
def test_official_pth_mapping(tmp_path, swiglu):
    """Write a tiny model in the official key layout and check the loader maps it back exactly."""
    dino = _tiny_dinov2(swiglu)
    sd = dino.state_dict()
    official = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
                "mask_token": sd["embeddings.mask_token"][None],
                "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
                "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
                "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    p = "encoder.layer.0."
    for kind in ("weight", "bias"):
        official[f"blocks.0.attn.qkv.{kind}"] = torch.cat([sd[f"{p}attention.{n}_proj.{kind}"] for n in "qkv"])
        official[f"blocks.0.attn.proj.{kind}"] = sd[f"{p}attention.o_proj.{kind}"]
        for n in ("norm1", "norm2"):
            official[f"blocks.0.{n}.{kind}"] = sd[f"{p}{n}.{kind}"]
        if swiglu:
            official[f"blocks.0.mlp.w12.{kind}"] = torch.cat([sd[f"{p}mlp.gate_proj.{kind}"], sd[f"{p}mlp.up_proj.{kind}"]])
            official[f"blocks.0.mlp.w3.{kind}"] = sd[f"{p}mlp.down_proj.{kind}"]
        else:
            official[f"blocks.0.mlp.fc1.{kind}"] = sd[f"{p}mlp.fc1.{kind}"]
            official[f"blocks.0.mlp.fc2.{kind}"] = sd[f"{p}mlp.fc2.{kind}"]
    official["blocks.0.ls1.gamma"] = sd[f"{p}layer_scale1.lambda1"]
    official["blocks.0.ls2.gamma"] = sd[f"{p}layer_scale2.lambda1"]
    if not swiglu:  # the loader infers mlp_ratio from fc1; the tiny config uses 4 x 16 = 64
        assert official["blocks.0.mlp.fc1.weight"].shape[0] == 64
    # width 16 is not an official size: register it for the test
    import idgbr.nn.repa as repa

    repa._HEADS[16] = 2
    try:
        torch.save(official, tmp_path / "dinov2_tiny.pth")
        loaded = load_dinov2(tmp_path / "dinov2_tiny.pth")
    finally:
        del repa._HEADS[16]
    image = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=image).last_hidden_state, dino(pixel_values=image).last_hidden_state)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_hf_folder_and_errors(tmp_path):
    dino = _tiny_dinov2()
    dino.save_pretrained(tmp_path / "hf")
    loaded = load_dinov2(tmp_path / "hf")
    assert loaded.config.hidden_size == 16
    with pytest.raises(IdgbrError, match="nowhere"):
        load_dinov2(tmp_path / "nowhere")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(IdgbrError, match="junk.pth"):
        load_dinov2(tmp_path / "junk.pth")
