"""Labels of a flat image folder (ImageNet's `val/`) for `ddaepp cache-latents --labels FILE --classes SRC`.

Accepted label files:

- ImageNet's `LOC_val_solution.csv` (the Kaggle ILSVRC release): a header `ImageId,PredictionString`,
  then one row per image, `ILSVRC2012_val_00000001,n01751748 54 0 499 339 n01751748 …`; the image's
  class is the first word of PredictionString (a WordNet id). ImageId is the file name without its
  extension.
- A text file of `<file> <label>` lines (Caffe's ILSVRC2012 `val.txt`: `ILSVRC2012_val_00000001.JPEG 65`),
  separated by white space; `<label>` is a class index (0-based, into the class list) or a class name.
  Blank lines and lines starting with `#` are skipped. `<file>` is the file's path relative to the
  folder (its name, for a flat folder); the extension may be left out.

The class list (`--classes SRC`) is that of the training split, so that the two caches index the same
classes: SRC is a latent cache (its manifest's class names) or a class-folder image folder (its sorted
subfolder names, as `cache-latents` and torchvision's ImageFolder number them). Every image of the
folder needs a label; a label file may name more images than the folder holds (a subset of val).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import UsageError


def class_list(source: str | os.PathLike) -> list[str]:
    """Class names of a latent cache (manifest) or of a class-folder image folder."""
    from .latentstore import MANIFEST, read_manifest

    src = Path(source)
    if (src / MANIFEST).is_file():
        names = read_manifest(src).get("class_names")
        if not names:
            raise UsageError(f"--classes {src}: this latent cache has no class names (made from a flat folder)")
        return list(names)
    if not src.is_dir():
        raise UsageError(f"--classes {src}: not a latent cache or an image folder with one subfolder per class")
    names = sorted(e for e in os.listdir(src) if not e.startswith(".") and (src / e).is_dir())
    if not names:
        raise UsageError(f"--classes {src}: no class subfolders (and no manifest.json of a latent cache)")
    return names


def _stem(name: str) -> str:
    base, ext = os.path.splitext(name)
    return base if ext else name


def read_label_file(path: str | os.PathLike) -> tuple[dict[str, str], str]:
    """{file key (relative path, no extension) → label text} and the format's name."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--labels {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--labels {path}: cannot read it as text ({e})") from None
    out: dict[str, str] = {}
    first = text.lstrip().split("\n", 1)[0].strip().lower().replace(" ", "")
    if first.startswith("imageid,predictionstring"):
        rows = csv.reader(text.splitlines()[1:])
        for n, row in enumerate(rows, start=2):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2 or not row[1].split():
                raise UsageError(f"--labels {path}, line {n}: expected `ImageId,PredictionString` "
                                 f"(LOC_val_solution.csv), got {','.join(row)[:80]!r}")
            out[_stem(row[0].strip())] = row[1].split()[0]
        return out, "LOC_val_solution.csv (ImageId, first WordNet id of PredictionString)"
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UsageError(f"--labels {path}, line {n}: expected `<file> <label>` (e.g. "
                             f"`ILSVRC2012_val_00000001.JPEG 65`) or a LOC_val_solution.csv, got {line[:80]!r}")
        out[_stem(parts[0].replace("\\", "/"))] = parts[1]
    if not out:
        raise UsageError(f"--labels {path} holds no labels")
    return out, "text: <file> <label> per line"


def labels_for(files: list[str], root: str | os.PathLike, label_file: str | os.PathLike,
               classes: list[str]) -> tuple[list[int], str]:
    """Class indices of `files` (paths under `root`) from a label file, and the file's format."""
    table, fmt = read_label_file(label_file)
    index = {name: i for i, name in enumerate(classes)}
    labels = []
    for f in files:
        key = _stem(os.path.relpath(f, root).replace(os.sep, "/"))
        if key not in table:
            raise UsageError(f"--labels {label_file} has no label for {os.path.relpath(f, root)} "
                             f"(looked up as {key!r}); every image of the folder needs one")
        text = table[key]
        if text in index:
            labels.append(index[text])
        elif text.lstrip("-").isdigit():
            k = int(text)
            if not 0 <= k < len(classes):
                raise UsageError(f"--labels {label_file}: label {k} of {key} is outside 0..{len(classes) - 1} "
                                 f"(the {len(classes)} classes of --classes)")
            labels.append(k)
        else:
            raise UsageError(f"--labels {label_file}: label {text!r} of {key} is neither a class index nor one of "
                             f"the --classes names (e.g. {', '.join(classes[:3])})")
    return labels, fmt
