"""Lazy access to the tensors of a checkpoint, whatever its file layout.

Supported layouts: one `.safetensors` file, a sharded set described by a
`*.safetensors.index.json`, a folder holding either, and `.pth`/`.pt`/`.bin` pickles in
`torch.save`'s zip format, read with `torch.load(weights_only=True)` (never arbitrary code).
Tensors are read one at a time, so a caller can move each into its final dtype/device before
the next is touched: peak host RAM stays near one copy of the weights.

Every tensor `get` returns is the caller's own memory, never a view of a mapped file: a model
file replaced, rewritten or truncated on disk after loading cannot change or crash a loaded
model. Each floating tensor is checked for NaN/inf as it is read, so a damaged file is named
at load time instead of giving a black video.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .errors import CheckpointError
from .safetensors_reader import SafetensorsFile

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class TensorFile:
    """Read-only mapping from tensor names to lazily loaded tensors.

    `label` names the file(s) in every error message. Views made by `renamed` share the
    underlying files and never copy tensors.
    """

    def __init__(self, label: str, locations: dict[str, tuple[str, str]], pickles: dict[str, dict]):
        self.label = label
        # name -> (file path, key inside that file)
        self._locations = locations
        self._pickles = pickles
        self._handles: dict[str, object] = {}

    # -- mapping protocol -------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._locations)

    def __contains__(self, name: str) -> bool:
        return name in self._locations

    def __len__(self) -> int:
        return len(self._locations)

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def shape(self, name: str) -> tuple[int, ...]:
        path, key = self._locations[name]
        if path in self._pickles:
            return tuple(self._pickles[path][key].shape)
        return tuple(self._handle(path).shape(key))

    def get(self, name: str) -> torch.Tensor:
        """The tensor, in memory of its own (see the module's note), checked to be finite."""
        path, key = self._locations[name]
        if path in self._pickles:
            value = self._pickles[path][key].clone()  # loaded memory-mapped: copy out of the mapping
        else:
            value = self._handle(path).read(key)
        if value.is_floating_point() and not all_finite(value):
            raise CheckpointError(
                f"{path}: the tensor {key!r} holds NaN or infinite values, so the model would make black or "
                "broken frames. The file is damaged or was saved from a diverged run: download it again."
            )
        return value

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` strings of the first safetensors file (empty for pickles)."""
        for path, _ in self._locations.values():
            if path in self._pickles:
                return {}
            return dict(self._handle(path).metadata)
        return {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: self.shape(name) for name in self._locations}

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.get(name) for name in self._locations}

    # -- views ------------------------------------------------------------------------------
    def renamed(self, rename: Callable[[str], str | None]) -> TensorFile:
        """A view whose names are `rename(name)`; names mapped to None are left out."""
        locations = {}
        for name, location in self._locations.items():
            new = rename(name)
            if new is None:
                continue
            if new in locations:
                raise CheckpointError(
                    f"{self.label}: two tensors map to the same name {new!r}; the file mixes two "
                    "layouts of the same network. Use a file from one release only."
                )
            locations[new] = location
        view = TensorFile(self.label, locations, self._pickles)
        view._handles = self._handles
        return view

    def without_prefix(self, prefixes: Iterable[str]) -> TensorFile:
        """Strips the first matching prefix from every name that has one."""
        prefixes = tuple(prefixes)
        return self.renamed(lambda name: strip_prefix(name, prefixes))

    def under(self, prefix: str) -> TensorFile:
        """Only the tensors whose names start with `prefix`, named without it (one network of a
        whole-model file)."""
        return self.renamed(lambda name: name[len(prefix) :] if name.startswith(prefix) else None)

    def _handle(self, path: str) -> SafetensorsFile:
        if path not in self._handles:
            self._handles[path] = SafetensorsFile(path)
        return self._handles[path]


def tensors_in_memory(label: str, state_dict: dict[str, torch.Tensor]) -> TensorFile:
    """A state dict already in memory (e.g. from another loader) as a `TensorFile`; each tensor
    is copied when read, so the networks built from it own their weights."""
    return TensorFile(label, {name: (label, name) for name in state_dict}, {label: dict(state_dict)})


def strip_prefix(name: str, prefixes: Iterable[str]) -> str:
    """`name` without the first of `prefixes` it starts with (unchanged when none)."""
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def open_tensor_file(path: str | os.PathLike) -> TensorFile:
    """Opens a checkpoint for lazy reading; raises CheckpointError naming the file on failure."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder. Check the path or put the model file there.")
    if path.is_dir():
        return _open_folder(path)
    name = path.name
    if name.endswith(".index.json"):
        return _open_sharded(path)
    if name.endswith(".safetensors"):
        handle = SafetensorsFile(str(path))
        view = TensorFile(str(path), {k: (str(path), k) for k in handle.keys()}, {})
        view._handles[str(path)] = handle
        return view
    if name.endswith(PICKLE_SUFFIXES):
        return _open_pickle(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format. Give a .safetensors file, a .safetensors.index.json of "
        "shards, a folder holding them, or a .pth file."
    )


def _open_folder(folder: Path) -> TensorFile:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _open_sharded(indexes[0])
    singles = sorted(folder.glob("*.safetensors"))
    if not indexes and len(singles) == 1:
        return open_tensor_file(singles[0])
    raise CheckpointError(
        f"{folder}: expected one .safetensors file or one .safetensors.index.json in this folder, "
        f"found {len(singles)} .safetensors and {len(indexes)} index files. Point at the file itself."
    )


def _open_sharded(index_path: Path) -> TensorFile:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{index_path}: not a valid safetensors index ({err}). Download the index file again."
        ) from None
    folder = index_path.parent
    missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
    if missing:
        raise CheckpointError(
            f"{index_path}: {len(missing)} shard file(s) listed in the index are missing, e.g. "
            f"{missing[:3]}. Download every shard into {folder}."
        )
    locations = {key: (str(folder / shard), key) for key, shard in weight_map.items()}
    return TensorFile(str(index_path), locations, {})


def _open_pickle(path: Path) -> TensorFile:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path}: not a PyTorch zip checkpoint. This file is in the legacy pickle format (saved before "
            "PyTorch 1.6 or with _use_new_zipfile_serialization=False), or it is not a checkpoint at all; "
            "its pickle could run code, so it is not opened. Use the .safetensors release of this model, "
            "or re-save the weights with a current torch.save."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path}: holds objects other than tensors (its pickle would run code or build classes), so it "
            "is not loaded. Use the .safetensors release of this model, or a file that holds only weights."
        ) from None
    except Exception as err:  # torch raises many types for damaged zips
        raise CheckpointError(
            f"{path}: could not be read as a PyTorch checkpoint ({type(err).__name__}). The file is damaged "
            "or cut off: download it again, or use the .safetensors release."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no plain tensor dictionary. Use the model's weights file.")
    return TensorFile(str(path), {k: (str(path), k) for k in state}, {str(path): state})


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one reduction: a float32 sum is finite exactly when no
    value is NaN/inf, unless finite values overflow it, which the exact check then settles."""
    if tensor.numel() == 0:
        return True
    values = tensor if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else tensor.float()
    if torch.isfinite(values.sum(dtype=torch.float64 if values.dtype == torch.float64 else torch.float32)):
        return True
    return bool(torch.isfinite(values).all())
