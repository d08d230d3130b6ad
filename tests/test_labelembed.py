"""Label embedding: the authors' released files load and match their definition; training moves the table."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from idgbr.nn.labelembed import LabelEmbedding, embedding_accuracy, train_label_embedding

torch.set_num_threads(1)  # the CI/dev box is small and shared: avoid thread oversubscription


def _numpy_logits(folder, labels: np.ndarray) -> np.ndarray:
    """Hand-written definition: 2 sigmoid(table[y]) - 1, 1x1 conv 3->128, ReLU, 1x1 conv 128->K."""
    w = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    e = 2 / (1 + np.exp(-w["embedding_table.weight"][labels])) - 1  # (B, H, W, 3)
    h = np.einsum("bhwc,oc->bhwo", e, w["embedding_conv.0.weight"][:, :, 0, 0]) + w["embedding_conv.0.bias"]
    h = np.maximum(h, 0)
    out = np.einsum("bhwc,oc->bhwo", h, w["embedding_conv.2.weight"][:, :, 0, 0]) + w["embedding_conv.2.bias"]
    return out.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name,classes", [("labelembednet2", 2), ("labelembednet8", 8)])
def test_reference_files_match_definition(datasets_dir, name, classes):
    folder = datasets_dir / "reference_labelembed" / name
    model = LabelEmbedding.from_pretrained(folder).eval()
    assert model.num_classes == classes == json.loads((folder / "config.json").read_text())["num_classes"]
    labels = np.random.default_rng(0).integers(0, classes, (2, 5, 7))
    with torch.no_grad():
        logits = model(torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(logits, _numpy_logits(folder, labels), rtol=1e-5, atol=1e-5)
    # the released decoder classifies its own clean embeddings
    assert (logits.argmax(1) == labels).all()


def test_encode_shapes_soft_and_ignore():
    model = LabelEmbedding(num_classes=5, hidden=8)
    labels = torch.randint(0, 5, (2, 6, 6))
    hard = model.encode(labels)
    assert hard.shape == (2, 3, 6, 6) and hard.abs().max() < 1
    torch.testing.assert_close(model.encode(labels[:, None]), hard)
    onehot = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(model.encode(onehot), hard)
    ignored = labels.clone()
    ignored[0, 0, 0] = 255
    assert torch.equal(model.encode(ignored)[0, :, 0, 0], model.class_embeddings()[0])
    assert model.decode(hard).shape == (2, 5, 6, 6)
    with pytest.raises(ValueError):
        model.encode(torch.full((1, 2, 2), 7))


def test_training_moves_table_and_separates():
    torch.manual_seed(123)  # training must not depend on the global RNG
    a = train_label_embedding(4, steps=60, noise_std=0.15, batch=2, res=16, hidden=16, seed=0, progress=False)
    b = train_label_embedding(4, steps=0, batch=2, res=16, hidden=16, seed=0, progress=False)
    assert not torch.allclose(a.embedding_table.weight, b.embedding_table.weight)  # the table learned
    assert embedding_accuracy(a, 0.0) == 1.0
    assert embedding_accuracy(a, 0.15) > 0.95
    c = train_label_embedding(4, steps=60, noise_std=0.15, batch=2, res=16, hidden=16, seed=0, progress=False)
    assert torch.equal(a.embedding_table.weight, c.embedding_table.weight)  # deterministic given seed


def test_train_embed_command(tmp_path):
    from idgbr.commands.main import main

    assert main(["train-embed", "--classes", "3", "--out", str(tmp_path / "emb"), "--steps", "5", "--hidden", "8"]) == 0
    loaded = LabelEmbedding.from_pretrained(tmp_path / "emb")
    assert loaded.num_classes == 3 and loaded.config.hidden == 8


def test_decode_layout_gives_the_nchw_values_and_gradients():
    """decode runs its 1x1 convolutions channels-last (speed); values and input gradients match the plain NCHW
    Sequential to float tolerance."""
    torch.manual_seed(0)
    model = LabelEmbedding(num_classes=6, hidden=32)
    x = torch.randn(2, 3, 24, 24, requires_grad=True)
    y = torch.randn(2, 3, 24, 24, requires_grad=True)
    with torch.no_grad():
        y.copy_(x)
    fast, plain = model.decode(x), model.embedding_conv(y)
    assert fast.shape == plain.shape == (2, 6, 24, 24)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    (fast * plain.detach()).sum().backward()
    (plain * plain.detach()).sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)


def test_inference_decode_in_pixel_blocks_gives_the_convolutions_values():
    """Without autograd on the CPU, decode runs blocked matrix products (speed): the same logits as the 1x1
    convolutions, across block edges, and that path is the one taken."""
    torch.manual_seed(0)
    model = LabelEmbedding(num_classes=5, hidden=32)
    x = torch.randn(2, 3, 40, 70)  # 5600 pixels: two full blocks of 2048 and a partial one
    plain = model.embedding_conv(x)
    with torch.no_grad():
        fast = model.decode(x)
        blocks = model._decode_blocks(x, block=333)
    torch.testing.assert_close(fast, plain.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(blocks, plain.detach(), rtol=1e-5, atol=1e-5)
    calls = []
    model._decode_blocks = lambda e, block=2048: calls.append(e.shape) or plain.detach()
    with torch.no_grad():
        model.decode(x)
    model.decode(x)  # with autograd: the convolutions
    assert calls == [x.shape]
