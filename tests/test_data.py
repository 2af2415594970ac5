"""Data layer: real on-disk formats at tiny sizes (CIFAR python batches, image folders), digits,
the restricted unpickler, and the batch stream's order rule (world-size invariance, resume)."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ddaepp_cli import data
from ddaepp_cli.data import (
    BatchStream,
    apply_hflip,
    from_model_range,
    hflip_mask,
    load_dataset,
    random_hflip,
    read_pickle_restricted,
    to_model_range,
)
from ddaepp_cli.errors import UnavailableError, UsageError

# ------------------------------------------------------------------------------------------
# writers for the real CIFAR format
# ------------------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as python-2 `str` (BINSTRING), as cPickle did for the official files."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump(obj: dict, path, style: str) -> None:
    """style: py2 (bytes keys, BINSTRING, numpy.core globals, protocol 2, like the official files),
    py3-bytes (protocol 2 from python 3: bytes via _codecs.encode), py3-str (str keys, protocol 5)."""
    if style == "py2":
        import io

        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        raw = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"_codecs" not in raw and (b"numpy" not in raw or b"cnumpy.core.multiarray\n_reconstruct\n" in raw)
    elif style == "py3-bytes":
        raw = pickle.dumps(obj, protocol=2)
    else:
        obj = {k.decode(): v for k, v in obj.items()}
        raw = pickle.dumps(obj, protocol=5)
    with open(path, "wb") as f:
        f.write(raw)


def _cifar_pixels(n: int, offset: int) -> np.ndarray:
    rng = np.random.default_rng(offset)
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # (N, 3072) = R | G | B planes


def write_cifar10(root, style: str = "py2", per_batch: int = 3, n_test: int = 4) -> dict:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    truth = {"train": [], "test": []}
    for i in range(1, 6):
        x = _cifar_pixels(per_batch, i)
        y = [(i + j) % 10 for j in range(per_batch)]
        _dump({b"batch_label": b"training batch %d of 5" % i, b"data": x, b"labels": y,
               b"filenames": [b"img_%d_%d.png" % (i, j) for j in range(per_batch)]}, folder / f"data_batch_{i}", style)
        truth["train"].append((x, y))
    x = _cifar_pixels(n_test, 99)
    _dump({b"data": x, b"labels": list(range(n_test))}, folder / "test_batch", style)
    truth["test"].append((x, list(range(n_test))))
    names = [n.encode() for n in data.CIFAR10_CLASSES]
    _dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, folder / "batches.meta", style)
    return truth


def write_cifar100(root, style: str = "py2", n_train: int = 7, n_test: int = 3) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n, off in (("train", n_train, 5), ("test", n_test, 6)):
        _dump({b"data": _cifar_pixels(n, off), b"fine_labels": [(13 * j) % 100 for j in range(n)],
               b"coarse_labels": [j % 20 for j in range(n)]}, folder / split, style)
    _dump({b"fine_label_names": [b"class%02d" % k for k in range(100)],
           b"coarse_label_names": [b"super%02d" % k for k in range(20)]}, folder / "meta", style)


# ------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py2", "py3-bytes", "py3-str"])
def test_cifar10_reads_the_python_batches(tmp_path, style):
    truth = write_cifar10(tmp_path, style)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.in_memory and len(ds) == 15 and ds.num_classes == 10 and ds.channels == 3 and ds.image_size == 32
    assert ds.images.shape == (15, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == [y for _, ys in truth["train"] for y in ys]
    assert ds.class_names[3] == "cat"
    # pixel layout: row i of batch 2 holds R, G, B planes of 32 rows of 32 → images[3 + i, c, y, x]
    x2 = truth["train"][1][0]
    for c, y, x in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert ds.images[3 + 1, c, y, x] == x2[1, c * 1024 + y * 32 + x]
    image, label = ds[4]
    assert torch.equal(image, torch.from_numpy(x2[1].reshape(3, 32, 32))) and label == truth["train"][1][1][1]
    test = load_dataset("cifar10", split="test", root=str(tmp_path))
    assert len(test) == 4 and test.labels.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("style", ["py2", "py3-str"])
def test_cifar100_reads_fine_labels_and_names(tmp_path, style):
    write_cifar100(tmp_path, style)
    ds = load_dataset("cifar100", root=str(tmp_path))
    assert len(ds) == 7 and ds.num_classes == 100 and ds.images.shape == (7, 3, 32, 32)
    assert ds.labels.tolist() == [(13 * j) % 100 for j in range(7)]
    assert ds.class_names[42] == "class42" and len(ds.class_names) == 100
    assert load_dataset("cifar100", split="test", root=str(tmp_path)).images.shape == (3, 3, 32, 32)


class _System:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": _System(f"touch {marker}"), b"labels": [0]}, f, protocol=2)
    with pytest.raises(UsageError, match=r"refusing to unpickle (posix|os|nt)\.system from .*data_batch_2") as e:
        load_dataset("cifar10", root=str(tmp_path))
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert not marker.exists()
    for gadget in (eval, getattr):  # builtins: the classic gadgets
        path = tmp_path / f"{gadget.__name__}.pkl"
        path.write_bytes(pickle.dumps({"x": _Gadget(gadget)}, protocol=4))
        with pytest.raises(UsageError, match=f"refusing to unpickle builtins.{gadget.__name__}"):
            read_pickle_restricted(str(path))


class _Gadget:
    def __init__(self, fn):
        self.fn = fn

    def __reduce__(self):
        return (self.fn, ("1",) if self.fn is eval else (1, "real"))


def test_garbage_and_wrong_shapes_are_usage_errors(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    (folder / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(UsageError, match="cannot read .*data_batch_3"):
        load_dataset("cifar10", root=str(tmp_path))
    _dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, folder / "data_batch_3", "py2")
    with pytest.raises(UsageError, match=r"data_batch_3: 'data' must be a uint8 array of shape \(N, 3072\)"):
        load_dataset("cifar10", root=str(tmp_path))
    _dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, folder / "data_batch_3", "py2")
    with pytest.raises(UsageError, match="labels must lie in 0..9"):
        load_dataset("cifar10", root=str(tmp_path))


def test_missing_cifar_offline_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("DDAEPP_DATA", str(tmp_path / "store"))
    with pytest.raises(UnavailableError) as e:
        load_dataset("cifar10")  # root from $DDAEPP_DATA
    msg = str(e.value)
    assert e.value.exit_code == 3 and "\n" not in msg
    assert f"{tmp_path}/store/cifar-10-batches-py" in msg
    assert "data_batch_1..5, test_batch" in msg and "cifar-10-python.tar.gz" in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg and "data.download=true" in msg
    with pytest.raises(UnavailableError, match=r"CIFAR-100 not found under .*cifar-100-python \(missing test"):
        load_dataset("cifar100", split="test", root=str(tmp_path))


def test_download_goes_through_torchvision_and_failures_are_unavailable(tmp_path, monkeypatch, capsys):
    tvd = pytest.importorskip("torchvision.datasets")
    calls = []

    class Offline:
        def __init__(self, root, train, download):
            raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    class Fetches:
        def __init__(self, root, train, download):
            print("Downloading https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
            calls.append((root, train, download))
            write_cifar10(tmp_path)

    monkeypatch.setattr(tvd, "CIFAR10", Offline)
    with pytest.raises(UnavailableError, match=r"downloading CIFAR-10 failed \(<urlopen error .*\)\. CIFAR-10 not found") as e:
        load_dataset("cifar10", root=str(tmp_path), download=True)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(tvd, "CIFAR10", Fetches)
    assert len(load_dataset("cifar10", root=str(tmp_path), download=True)) == 15
    assert calls == [(str(tmp_path), True, True)]
    assert capsys.readouterr().out == ""  # progress went to stderr: stdout stays clean for --json
    load_dataset("cifar10", root=str(tmp_path), download=True)
    assert len(calls) == 1  # present files are not fetched again


def test_full_size_file_with_wrong_md5_is_corrupt(tmp_path):
    write_cifar10(tmp_path)
    # batches.meta is officially 158 bytes: a file of that size must carry the official MD5
    (tmp_path / "cifar-10-batches-py" / "batches.meta").write_bytes(b"x" * 158)
    with pytest.raises(UsageError, match=r"batches.meta is corrupt \(MD5 [0-9a-f]{32}, official 5ff9c542"):
        load_dataset("cifar10", root=str(tmp_path))


def test_official_checksums_match_torchvision():
    tv = pytest.importorskip("torchvision.datasets.cifar")
    for name, cls in (("cifar10", tv.CIFAR10), ("cifar100", tv.CIFAR100)):
        spec = data.CIFAR[name]
        official = {f: md5 for f, md5 in cls.train_list + cls.test_list}
        official[cls.meta["filename"]] = cls.meta["md5"]
        assert {f: md5 for f, (_, md5) in spec.official.items()} == official
        assert spec.folder == cls.base_folder and spec.archive == cls.filename


def test_cifar_rejects_other_sizes(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(UsageError, match="32x32"):
        load_dataset("cifar10", root=str(tmp_path), image_size=64)
    assert load_dataset("cifar10", root=str(tmp_path), image_size=32).image_size == 32


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UsageError, match="unknown dataset 'imagenet'; valid: digits, cifar10, cifar100, imagefolder"):
        load_dataset("imagenet")
    with pytest.raises(UsageError, match="unknown split 'val' for digits; valid: train, test"):
        load_dataset("digits", split="val")


# ------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, test = (data.digits_split_indices(target, s) for s in ("train", "test"))
    assert (len(train), len(test)) == (1442, 355)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    per_class = np.bincount(target[test], minlength=10) / np.bincount(target, minlength=10)
    assert np.all(np.abs(per_class - 0.2) < 0.01)


def test_digits_images():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and train.num_classes == 10 and train.channels == 1
    assert train.images.shape == (1442, 1, 16, 16) and train.images.dtype == torch.uint8
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    assert torch.equal(load_dataset("digits").images, train.images)  # deterministic
    assert load_dataset("digits", image_size=32).images.shape == (1442, 1, 32, 32)
    native = load_dataset("digits", split="test", image_size=8)
    raw = load_digits()
    idx = data.digits_split_indices(raw.target, "test")
    expected = np.round(raw.images[idx] * 255 / 16).astype(np.uint8)
    assert np.array_equal(native.images[:, 0].numpy(), expected)
    assert native.labels.tolist() == raw.target[idx].tolist()
    with pytest.raises(UsageError, match="at least 8"):
        load_dataset("digits", image_size=4)


# ------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------


def _png(path, size=(8, 8), value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, np.uint8)
    arr[0, 0] = (value, 255 - value, 7)
    Image.fromarray(arr).save(path)


def test_imagefolder_class_subfolders(tmp_path):
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _png(tmp_path / "train" / cls / f"{i}.png", value=10 * i)
    _png(tmp_path / "train" / "dog" / "deep" / "x.PNG")  # nested, upper-case extension
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", root=str(tmp_path))  # uses <root>/train
    assert not ds.in_memory and len(ds) == 6 and ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert [ds[i][1] for i in range(6)] == [0, 0, 1, 1, 1, 1]
    image, _ = ds[1]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert image[:, 0, 0].tolist() == [10, 245, 7] and image[0, 3, 3] == 10
    with pytest.raises(UsageError, match="no val folder under"):
        load_dataset("imagefolder", root=str(tmp_path), split="val")


def test_imagefolder_flat_and_resize(tmp_path):
    _png(tmp_path / "a.jpg", size=(12, 8))
    _png(tmp_path / "b.webp", size=(20, 20))
    ds = load_dataset("imagefolder", root=str(tmp_path), image_size=6)
    assert len(ds) == 2 and ds.class_names is None and ds.image_size == 6
    assert [ds[i][1] for i in range(2)] == [0, 0] and ds[0][0].shape == (3, 6, 6) and ds[1][0].shape == (3, 6, 6)


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        load_dataset("imagefolder", root=str(tmp_path / "empty"))
    _png(tmp_path / "mixed" / "a.png", size=(8, 8))
    _png(tmp_path / "mixed" / "b.png", size=(9, 9))
    with pytest.raises(UsageError, match=r"mixed/b.png is 9x9 but .*mixed/a.png is 8x8"):
        load_dataset("imagefolder", root=str(tmp_path / "mixed"))
    _png(tmp_path / "oblong" / "a.png", size=(8, 6))
    with pytest.raises(UsageError, match="8x6, not square; set data.image_size"):
        load_dataset("imagefolder", root=str(tmp_path / "oblong"))
    assert load_dataset("imagefolder", root=str(tmp_path / "oblong"), image_size=4)[0][0].shape == (3, 4, 4)
    _png(tmp_path / "bad" / "a.png")
    (tmp_path / "bad" / "b.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(UsageError, match=r"cannot read image .*bad/b.png") as e:
        load_dataset("imagefolder", root=str(tmp_path / "bad"))
    assert "\n" not in str(e.value)
    _png(tmp_path / "loose" / "a.png")
    _png(tmp_path / "loose" / "cls" / "b.png")
    with pytest.raises(UsageError, match="mixes class subfolders with loose images"):
        load_dataset("imagefolder", root=str(tmp_path / "loose"))


def _truncated_folder(root):
    for i in range(4):
        _png(root / f"{i}.png", size=(32, 32), value=i)
    # a valid header with the pixel data cut off: passes verify(), fails when decoded
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "3.png")
    (root / "3.png").write_bytes((root / "3.png").read_bytes()[:120])


def test_truncated_image_fails_when_read_naming_it(tmp_path):
    _truncated_folder(tmp_path)
    ds = load_dataset("imagefolder", root=str(tmp_path))
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(UsageError, match=r"cannot read image .*3.png"):
        ds[3]


# ------------------------------------------------------------------------------------------
# BatchStream
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", split="test")  # 355 images


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_ranks_partition_the_global_batch(digits):
    one = _take(BatchStream(digits, global_batch=32, seed=3), 14)  # crosses the epoch boundary (11 steps)
    ranks = [_take(BatchStream(digits, global_batch=32, seed=3, rank=r, world_size=2), 14) for r in range(2)]
    for step, (images, labels) in enumerate(one):
        assert images.shape == (32, 1, 16, 16) and labels.dtype == torch.int64
        assert ranks[0][step][0].shape == (16, 1, 16, 16)
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), images)
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), labels)


def test_resume_reproduces_the_uninterrupted_run(digits):
    full = BatchStream(digits, global_batch=24, seed=7)
    reference = _take(full, 20)
    late = BatchStream(digits, global_batch=24, seed=7, start_step=13)
    for want, got in zip(reference[13:], _take(late, 7)):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    # through state_dict, into a stream with another world size (rank 1 of 4)
    saved = BatchStream(digits, global_batch=24, seed=7)
    _take(saved, 5)
    state = saved.state_dict()
    assert state == {"seed": 7, "step": 5, "global_batch": 24, "world_size": 1, "num_samples": 355}
    other = BatchStream(digits, global_batch=24, world_size=4, rank=1)
    other.load_state_dict(state)
    assert torch.equal(next(other)[0], reference[5][0][6:12]) and other.step == 6
    with pytest.raises(UsageError, match="global batch 24 and train.global_batch is now 48"):
        BatchStream(digits, global_batch=48).load_state_dict(state)


def test_epochs_reshuffle_and_cover_without_repeats(digits):
    stream = BatchStream(digits, global_batch=50, seed=0)
    assert stream.steps_per_epoch == 7
    epoch0 = torch.cat([stream.global_indices(s) for s in range(7)])
    epoch1 = torch.cat([stream.global_indices(s) for s in range(7, 14)])
    assert len(set(epoch0.tolist())) == 350 and len(set(epoch1.tolist())) == 350
    assert not torch.equal(epoch0, epoch1)
    other_seed = BatchStream(digits, global_batch=50, seed=1)
    assert not torch.equal(epoch0, torch.cat([other_seed.global_indices(s) for s in range(7)]))
    stream.step = 7
    assert stream.epoch == 1 and torch.equal(next(stream)[1], digits.labels[epoch1[:50]])


def test_stream_argument_checks(digits):
    with pytest.raises(UsageError, match="multiple of the number of processes"):
        BatchStream(digits, global_batch=10, world_size=3)
    with pytest.raises(UsageError, match="has 355 images, fewer than one global batch of 512"):
        BatchStream(digits, global_batch=512)
    assert BatchStream(digits, global_batch=512, drop_last=False).steps_per_epoch == 1


def test_folder_stream_matches_the_index_rule(tmp_path):
    for i in range(10):
        _png(tmp_path / f"c{i % 2}" / f"{i}.png", size=(4, 4), value=20 * i)
    ds = load_dataset("imagefolder", root=str(tmp_path))
    stream = BatchStream(ds, global_batch=4, seed=5, rank=1, world_size=2, start_step=1)
    rule = BatchStream(ds, global_batch=4, seed=5, rank=1, world_size=2)
    for step in range(1, 6):  # epochs of 2 steps
        images, labels = next(stream)
        idx = rule.indices(step).tolist()
        assert images.shape == (2, 3, 4, 4) and images.dtype == torch.uint8
        assert torch.equal(images, torch.stack([ds[i][0] for i in idx]))
        assert labels.tolist() == [ds[i][1] for i in idx]
    assert stream.step == 6


def test_folder_stream_workers_carry_one_line_errors(tmp_path):
    _truncated_folder(tmp_path)
    ds = load_dataset("imagefolder", root=str(tmp_path))
    stream = BatchStream(ds, global_batch=4, num_workers=1)
    with pytest.raises(UsageError, match=r"^cannot read image .*3.png") as e:
        next(stream)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


# ------------------------------------------------------------------------------------------
# pixel helpers
# ------------------------------------------------------------------------------------------


def test_model_range_round_trip_is_exact():
    x = torch.arange(256, dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y[0] == -1 and y[-1] == 1
    assert torch.equal(from_model_range(y), x)
    assert from_model_range(torch.tensor([-3.0, 3.0, 0.0])).tolist() == [0, 255, 128]  # clamp; 127.5 rounds to even


def test_random_hflip_is_batched_and_reproducible():
    x = torch.arange(1000 * 2 * 3 * 4).view(1000, 2, 3, 4)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert torch.all(flipped ^ kept)  # every sample either mirrored or untouched, none both
    assert 430 < int(flipped.sum()) < 570
    assert torch.equal(out, random_hflip(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, random_hflip(x, torch.Generator().manual_seed(1)))
    mask = hflip_mask(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, flipped) and torch.equal(apply_hflip(x, mask), out)
