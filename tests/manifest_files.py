"""Checkpoint files in the field's real layouts, built from the manifests in tests/manifests/.

Each manifest (one per `ddaepp import` family and per VAE layout) was produced outside this repository by
running the official repository's own constructor and save call (the manifest names the repository,
commit, call and library versions). It lists what that code writes: the files, their format
(torch.save / safetensors / json), the nesting of dicts, lists, argparse Namespaces and scalars, and every
tensor's key, shape and dtype, at the released size and at one small size.

Node grammar (JSON):
  [shape, dtype] / [shape, dtype, values]   a tensor (values: derived tables such as pos_embed, scalars)
  {"state_dict": {key: tensor}, "type": …}  str-keyed dict of tensors ("type": "OrderedDict" as torch writes it)
  {"state_dict_parts": [part, …]}           the same, listed in runs: {"state_dict": …} or
                                            {"renamed_copy_of": path, "from_prefix": a, "to_prefix": b}
                                            (the keys of the state dict at `path` with prefix a → b)
  {"dict": {k: node}} / {"int_dict": …}     other dicts (int keys: optimizer state)
  {"namespace": {k: node}}                  argparse.Namespace
  {"list"|"tuple": [node]}, {"list_values"|"tuple_values": [v]}, {"value": v}
  {"same_as": path}                         the node at `path` (keys separated by "/", from the file's root)
  "module_versions" next to a state dict counts the modules in torch's `_metadata` (not rebuilt).

`build` makes the object: tensors with recorded values get them; others get deterministic random values
(seeded by their key path, so the EMA and raw copies differ) or, on the meta device, no data. `write`
saves each file of a size entry as the official code does.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch

MANIFESTS = Path(__file__).parent / "manifests"
Fill = Callable[[str, tuple, torch.dtype], "torch.Tensor | None"]


def load(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text(encoding="utf-8"))


def entry(name: str, *path: str) -> dict:
    """The manifest `name`, then keys `path` (e.g. entry("sit", "layouts", "released", "sizes", "small"))."""
    node = load(name)
    for key in path:
        node = node[key]
    return node


def _is_tensor(node) -> bool:
    return isinstance(node, list) and len(node) in (2, 3) and isinstance(node[0], list) and isinstance(node[1], str)


def _children(node: dict) -> dict:
    for key in ("dict", "state_dict", "int_dict", "namespace"):
        if key in node:
            return node[key]
    raise KeyError(f"not a container node: {list(node)}")


def _at(root: dict, path: str):
    node = root
    for key in path.split("/"):
        node = _children(node)[key]
    return node


def _tensor(node: list, path: str, device: str, seed: int, fill: Fill | None) -> torch.Tensor:
    shape, dtype = tuple(node[0]), getattr(torch, node[1])
    if fill is not None:
        t = fill(path, shape, dtype)
        if t is not None:
            return t
    if len(node) == 3:  # recorded values (small tables, scalars): real even in a meta build
        return torch.tensor(node[2], dtype=dtype).reshape(shape)
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta")
    if not (dtype.is_floating_point or dtype.is_complex):
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(path.encode()) ^ seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) > 1:  # weights: unit-variance outputs
        x = x / math.sqrt(max(1, math.prod(shape[1:])))
    elif path.endswith("weight"):  # norm scales around 1
        x = 1 + 0.1 * x
    else:
        x = 0.1 * x
    return x.to(dtype)


def build(node: Any, *, device: str = "cpu", seed: int = 0, fill: Fill | None = None, root: Any = None,
          path: str = "") -> Any:
    """The object a manifest node describes (module doc)."""
    root = node if root is None else root

    def sub(n, key):
        return build(n, device=device, seed=seed, fill=fill, root=root, path=f"{path}/{key}" if path else str(key))

    if _is_tensor(node):
        return _tensor(node, path, device, seed, fill)
    if "same_as" in node:
        return build(_at(root, node["same_as"]), device=device, seed=seed, fill=fill, root=root, path=path)
    if "value" in node:
        return node["value"]
    for kind, make in (("list_values", list), ("tuple_values", tuple)):
        if kind in node:
            return make(node[kind])
    if "list" in node:
        return [sub(v, i) for i, v in enumerate(node["list"])]
    if "tuple" in node:
        return tuple(sub(v, i) for i, v in enumerate(node["tuple"]))
    if "namespace" in node:
        return argparse.Namespace(**{k: sub(v, k) for k, v in node["namespace"].items()})
    ordered = node.get("type") == "OrderedDict"
    out: dict = OrderedDict() if ordered else {}
    if "state_dict_parts" in node:
        for part in node["state_dict_parts"]:
            if "renamed_copy_of" in part:
                ref = _at(root, part["renamed_copy_of"])["state_dict"]
                a, b = part["from_prefix"], part["to_prefix"]
                for k, v in ref.items():
                    out[b + k[len(a):]] = sub(v, b + k[len(a):])
            else:
                out.update({k: sub(v, k) for k, v in part["state_dict"].items()})
        return out
    if "int_dict" in node:
        out.update({int(k): sub(v, k) for k, v in node["int_dict"].items()})
        return out
    out.update({k: sub(v, k) for k, v in _children(node).items()})
    return out


def write(size: dict, folder: Path, *, device: str = "cpu", seed: int = 0, fill: Fill | None = None,
          only: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Save every file of a manifest size entry ({"files": {name: {"format", "content"}}}) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, spec in size["files"].items():
        if only is not None and name not in only:
            continue
        path = folder / name
        fmt = spec["format"]
        if fmt == "json":
            path.write_text(json.dumps(spec["content"], indent=2, sort_keys=True) + "\n", encoding="utf-8")
        else:
            obj = build(spec["content"], device=device, seed=seed, fill=fill)
            if fmt == "torch.save":
                torch.save(obj, path)
            elif fmt == "safetensors":
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in obj.items()}, str(path), metadata=spec.get("metadata"))
            else:
                raise ValueError(f"{name}: unknown format {fmt}")
        out[name] = path
    return out


def tensors(node: Any, root: Any = None, path: str = "") -> dict[str, tuple[tuple, str]]:
    """Every tensor a node describes: key path → (shape, dtype)."""
    built = build(node, device="meta", root=root, path=path)
    out = {}

    def walk(obj, p):
        if isinstance(obj, torch.Tensor):
            out[p] = (tuple(obj.shape), str(obj.dtype).removeprefix("torch."))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{p}/{k}" if p else str(k))
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{p}/{i}" if p else str(i))
        elif isinstance(obj, argparse.Namespace):
            walk(vars(obj), p)

    walk(built, "")
    return out
