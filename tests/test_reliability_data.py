"""Issue 9, the image-data cluster: what an ImageNet-layout folder can hold besides clean RGB JPEGs, and
what vitadapt does with it (vitadapt/datasets/imagenet.py's docstring states the rules).

Generated data only: tiny images written with PIL / numpy into tmp_path."""

import io
import json
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers_e2e as h
from vitadapt.config import load_config
from vitadapt.datasets import DataError, build_dataset, construct_loader
from vitadapt.datasets.imagenet import decode_rgb, to_rgb
from vitadapt.errors import VitadaptError


def make_cfg(data, tmp_path, **overrides):
    return load_config("", h.tiny_opts(data, tmp_path / "out", **overrides))


def dataset(data, tmp_path, split="train", **overrides):
    return build_dataset("imagenet", make_cfg(data, tmp_path, **overrides), split)


def png_claiming_size(path, width, height):
    """A 1x1 PNG whose header says width x height: PIL sees the size (and its bomb check fires) on open."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # size, then depth, colour, ... (13 bytes)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    Path(path).write_bytes(bytes(data))


def truncated_jpeg(path):
    buf = io.BytesIO()
    pixels = np.random.RandomState(0).randint(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    Path(path).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def warnings_of(caplog):
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---------------------------------------------------------------- 1. decompression bombs
@pytest.mark.parametrize("side", [20000, 10000], ids=["over_2x_limit_error", "over_limit_warning"])
def test_decompression_bomb_is_skipped_with_a_warning_naming_it(make_image_folder, tmp_path, caplog, side):
    # 20000^2 = 4.0e8 pixels > 2 * MAX_IMAGE_PIXELS: PIL raises; 10000^2 = 1.0e8 > MAX_IMAGE_PIXELS: PIL warns.
    data = make_image_folder(train_counts=(1, 1, 1))
    bomb = data / "train" / "dog" / "bomb.png"
    png_claiming_size(bomb, side, side)
    ds = dataset(data, tmp_path)
    index = [p for p, _ in ds.samples].index(str(bomb))
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ds[index] is None
        assert ds[index - 1] is not None
    log = warnings_of(caplog)
    assert str(bomb) in log and "decompression-bomb" in log
    assert f"MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}" in log and f"{side * side} pixels" in log
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


# ---------------------------------------------------------------- 2. every image mode
def _img(mode, size, pixels, **info):
    image = Image.new(mode, size)
    image.putdata(pixels)
    image.info.update(info)
    return image


def _palette_image(mode, indices_or_pairs):
    image = Image.new(mode, (len(indices_or_pairs), 1))
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putdata(indices_or_pairs)
    return image


def _write_pgm16(path, values):
    path.write_bytes(f"P5\n{len(values)} 1\n65535\n".encode() + np.asarray(values, ">u2").tobytes())


def _grey(*levels):
    return [(v, v, v) for v in levels]


SIXTEEN = [0, 32768, 65535, 257 * 100]  # -> 0, 128, 255, 100 in 8 bits
# (id, file name, writer(path), expected RGB of each pixel, tolerance)
MODE_CASES = [
    ("I;16_png", "a.png", lambda p: Image.fromarray(np.array([SIXTEEN], np.uint16)).save(p),
     _grey(0, 128, 255, 100), 0),
    ("I;16B_tiff", "a.tif", lambda p: Image.frombytes("I;16B", (4, 1), np.array(SIXTEEN, ">u2").tobytes()).save(p),
     _grey(0, 128, 255, 100), 0),
    ("I_pgm16", "a.pgm", lambda p: _write_pgm16(p, SIXTEEN), _grey(0, 128, 255, 100), 0),
    ("I_int32_tiff", "a.tif", lambda p: Image.fromarray(np.array([[0, 32768, 70000, -5]], np.int32), "I").save(p),
     _grey(0, 128, 255, 0), 0),  # read as 16-bit, clipped
    ("F_tiff", "a.tif", lambda p: Image.fromarray(np.array([[0.0, 128.0, 300.0, -3.0]], np.float32), "F").save(p),
     _grey(0, 128, 255, 0), 0),  # PIL's 0..255 scale for float
    ("1_png", "a.png", lambda p: _img("1", (2, 1), [0, 1]).save(p), _grey(0, 255), 0),
    ("L_png", "a.png", lambda p: _img("L", (2, 1), [77, 200]).save(p), _grey(77, 200), 0),
    ("LA_png", "a.png", lambda p: _img("LA", (2, 1), [(77, 0), (200, 255)]).save(p), _grey(77, 200), 0),
    ("P_png", "a.png", lambda p: _palette_image("P", [0, 1]).save(p), [(10, 20, 30), (200, 100, 50)], 0),
    ("P_transparent_index_png", "a.png", lambda p: _palette_image("P", [0, 1]).save(p, transparency=0),
     [(10, 20, 30), (200, 100, 50)], 0),  # not composited: the colour under the transparency
    ("P_transparency_bytes_png", "a.png", lambda p: _palette_image("P", [0, 1]).save(p, transparency=bytes([0, 128])),
     [(10, 20, 30), (200, 100, 50)], 0),
    ("PA_tiff", "a.tif", lambda p: _palette_image("PA", [(0, 0), (1, 255)]).save(p), [(10, 20, 30), (200, 100, 50)], 0),
    ("RGBA_png", "a.png", lambda p: _img("RGBA", (2, 1), [(10, 20, 30, 0), (40, 50, 60, 255)]).save(p),
     [(10, 20, 30), (40, 50, 60)], 0),  # alpha dropped, as convert("RGB") does
    ("CMYK_tiff", "a.tif", lambda p: _img("CMYK", (3, 1), [(0, 255, 255, 0), (0, 0, 0, 128), (0, 0, 0, 0)]).save(p),
     [(255, 0, 0), (127, 127, 127), (255, 255, 255)], 0),
    ("YCbCr_tiff", "a.tif", lambda p: _img("YCbCr", (2, 1), [(76, 85, 255), (128, 128, 128)]).save(p),
     [(255, 0, 0), (128, 128, 128)], 2),
    ("LAB_tiff", "a.tif", lambda p: _img("LAB", (3, 1), [(255, 128, 128), (0, 128, 128), (136, 128, 128)]).save(p),
     [(255, 255, 255), (0, 0, 0), (128, 128, 128)], 2),  # L* 100, 0, 53.4 (sRGB grey 128)
]


@pytest.mark.parametrize("name,filename,write,expected,tol", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_every_image_mode_decodes_to_the_right_rgb(tmp_path, name, filename, write, expected, tol):
    path = tmp_path / filename
    write(path)
    assert Image.open(path).mode == name.split("_")[0]  # the file really opens in the mode under test
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "Palette images with Transparency expressed in bytes ..."
        image = decode_rgb(str(path))
    assert image.mode == "RGB"
    got = np.asarray(image).reshape(-1, 3).astype(int)
    np.testing.assert_allclose(got, np.array(expected), atol=tol)
    if not name.startswith("I"):  # the same as torchvision's ImageFolder loader, except for 16-bit grey
        from torchvision.datasets.folder import pil_loader

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's loader lets PIL's palette warning through
            reference = np.asarray(pil_loader(str(path)))
        np.testing.assert_array_equal(np.asarray(image), reference)


def test_modes_without_a_file_format_and_unsupported_modes():
    hsv = to_rgb(_img("HSV", (3, 1), [(0, 255, 255), (85, 255, 255), (0, 0, 128)]))
    assert np.asarray(hsv).reshape(-1, 3).tolist() == [[255, 0, 0], [0, 255, 0], [128, 128, 128]]
    premultiplied = to_rgb(_img("RGBa", (1, 1), [(50, 50, 50, 128)]))
    assert np.asarray(premultiplied).reshape(-1, 3).tolist() == [[99, 99, 99]]
    with pytest.raises(ValueError, match="image mode 'La' is not supported"):
        to_rgb(Image.new("La", (1, 1)))


def test_sixteen_bit_png_through_the_dataset_is_mid_grey_not_white(make_image_folder, tmp_path):
    data = make_image_folder(train_counts=(1, 1, 1))
    path = data / "train" / "cat" / "img_00.png"
    Image.fromarray(np.full((40, 40), 32768, np.uint16)).save(path)
    ds = dataset(data, tmp_path, split="val")  # the eval transform: resize + crop, no colour change
    ds.samples = [(str(path), 0)]
    image, label = ds[0]
    # 128/255 normalized by mean 0.5, std 0.5 (convert("RGB") alone gives 255 -> 1.0)
    assert torch.allclose(image, torch.full_like(image, (128 / 255 - 0.5) / 0.5), atol=1e-4)


# ---------------------------------------------------------------- 3. empty class folders
def test_empty_class_folder_is_an_error_naming_it(make_image_folder, tmp_path):
    data = make_image_folder(train_counts=(2, 2, 2), val_counts=(1, 1, 1))
    (data / "train" / "ant").mkdir()  # would become class 0 and shift cat, dog, zebra to 1, 2, 3
    (data / "train" / "bee").mkdir()
    (data / "train" / "bee" / "notes.txt").write_text("not an image")
    for split in ("train", "val"):  # val takes its classes from train, so it fails the same way
        with pytest.raises(DataError) as e:
            dataset(data, tmp_path, split=split, MODEL__NUM_CLASSES=5)
        msg = str(e.value)
        assert f"empty class folder(s) in {data / 'train'}: ant, bee" in msg
        assert "shift every later class" in msg and str(data / "class_index.json") in msg


def test_empty_class_folder_listed_in_class_index_is_fine(make_image_folder, tmp_path):
    data = make_image_folder(train_counts=(2, 2, 2), val_counts=(1, 1, 1))
    (data / "train" / "ant").mkdir()
    (data / "class_index.json").write_text(json.dumps({"cat": 0, "dog": 1, "zebra": 2, "ant": 3}))
    ds = dataset(data, tmp_path, MODEL__NUM_CLASSES=4)
    assert ds.classes == {"cat": 0, "dog": 1, "zebra": 2, "ant": 3}
    assert sorted({label for _, label in ds.samples}) == [0, 1, 2]


# ---------------------------------------------------------------- 4. class_index.json
BAD_INDEX_FILES = [
    ("duplicate", '{"cat": 0, "dog": 0, "zebra": 1}', ["each class needs its own index", "0: 'cat' and 'dog'"]),
    ("over_num_classes", '{"cat": 0, "dog": 1, "zebra": 3}', ["must be < MODEL.NUM_CLASSES (3)", "'zebra': 3"]),
    ("bad_json", '{"cat": 0, "dog": 1,', ["is not valid JSON", 'expected {"<class folder>": <index>, ...}']),
    ("not_a_dict", '["cat", "dog", "zebra"]', ["must be a non-empty JSON object", '["cat", "dog", "zebra"]']),
    ("empty", "{}", ["must be a non-empty JSON object"]),
    ("not_integers", '{"cat": "0", "dog": 1.0, "zebra": true}',
     ["integers >= 0", "'cat': \"0\"", "'dog': 1.0", "'zebra': true"]),
    ("negative", '{"cat": -1, "dog": 1, "zebra": 2}', ["integers >= 0", "'cat': -1"]),
    ("missing_folder", '{"cat": 0, "dog": 1}', ["not among the 2 classes of", "zebra", "add it to"]),
]


@pytest.mark.parametrize("name,text,expected", BAD_INDEX_FILES, ids=[c[0] for c in BAD_INDEX_FILES])
def test_bad_class_index_is_a_data_error_naming_file_and_entries(image_folder, tmp_path, name, text, expected):
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(image_folder / "train", data / "train", target_is_directory=True)
    index_file = data / "class_index.json"
    index_file.write_text(text)
    with pytest.raises(DataError) as e:
        dataset(data, tmp_path)
    assert isinstance(e.value, VitadaptError)
    assert str(index_file) in str(e.value)
    for part in expected:
        assert part in str(e.value)


def test_bad_class_index_stops_run_net_at_start_up(image_folder, tmp_path, run_net, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        os.symlink(image_folder / split, data / split, target_is_directory=True)
    (data / "class_index.json").write_text('{"cat": 0, "dog": 0, "zebra": 1}')
    rc = run_net(["--cfg", ""] + h.tiny_opts(data, tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and str(data / "class_index.json") in err and "0: 'cat' and 'dog'" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- 5. a split that cannot be decoded at all
def test_split_of_undecodable_images_counts_files_and_skips_each(make_image_folder, tmp_path):
    data = make_image_folder(train_counts=(1, 1, 1), val_counts=(2, 1, 0))
    for path in (data / "val").rglob("*.png"):
        path.write_bytes(b"not an image")
    cfg = make_cfg(data, tmp_path, TEST__BATCH_SIZE=2)
    ds = build_dataset("imagenet", cfg, "val")
    assert len(ds) == 3 and ds.folder == str(data / "val")
    assert all(ds[i] is None for i in range(len(ds)))
    batches = list(construct_loader(cfg, "val"))
    assert [b["inputs"] for b in batches] == [None, None]
    assert sum(b["skipped"] for b in batches) == 3


# ---------------------------------------------------------------- 6. more of the same kind
def test_hidden_files_and_folders_are_not_data(make_image_folder, tmp_path):
    data = make_image_folder(train_counts=(2, 2, 2), val_counts=(1, 1, 1))
    (data / "train" / ".ipynb_checkpoints").mkdir()  # Jupyter: would become (empty) class 0
    (data / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (data / "train" / "cat" / "._img_00.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS resource fork
    (data / "val" / ".hidden_class").mkdir()
    for split in ("train", "val"):
        ds = dataset(data, tmp_path, split=split)
        assert ds.classes == {"cat": 0, "dog": 1, "zebra": 2}
        assert not [p for p, _ in ds.samples if "/." in p]
        assert all(ds[i] is not None for i in range(len(ds)))


def test_unreadable_files_with_image_names_are_skipped_with_the_reason(make_image_folder, tmp_path, caplog):
    data = make_image_folder(train_counts=(1, 1, 1))
    cat = data / "train" / "cat"
    (cat / "folder.jpg").mkdir()
    os.symlink(cat / "missing.png", cat / "broken_link.png")
    truncated_jpeg(cat / "truncated.jpg")
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(cat / "UPPER.JPG")
    ds = dataset(data, tmp_path)
    paths = [p for p, _ in ds.samples]
    with caplog.at_level(logging.WARNING):
        items = {Path(p).name: ds[i] for i, p in enumerate(paths)}
    assert items["UPPER.JPG"] is not None  # the extension check ignores case
    for name in ("folder.jpg", "broken_link.png", "truncated.jpg"):
        assert items[name] is None
    log = warnings_of(caplog)
    assert f"skipping undecodable image {cat / 'folder.jpg'}: [Errno 21] Is a directory" in log
    assert f"skipping undecodable image {cat / 'broken_link.png'}: [Errno 2] No such file" in log
    assert f"skipping undecodable image {cat / 'truncated.jpg'}: image file is truncated" in log


def test_images_smaller_than_the_crop_and_extreme_aspect_ratios(make_image_folder, tmp_path):
    data = make_image_folder(train_counts=(1, 1, 1), val_counts=(1, 1, 1))
    for i, size in enumerate([(1, 1), (3, 200), (200, 2)]):
        Image.fromarray(np.full((size[1], size[0], 3), 60, np.uint8)).save(data / "train" / "cat" / f"small_{i}.png")
    for split in ("train", "val"):
        ds = dataset(data, tmp_path, split=split)
        ds.samples = [(str(data / "train" / "cat" / f"small_{i}.png"), 0) for i in range(3)]
        for i in range(3):
            assert ds[i][0].shape == (3, 32, 32)


def test_exif_orientation_is_not_applied_like_torchvision(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (20, 10), (200, 30, 30)).save(path, exif=exif.tobytes())
    assert decode_rgb(str(path)).size == (20, 10)  # as stored, as torchvision's and timm's loaders give it


def test_layout_errors_name_the_folder_and_key(make_image_folder, tmp_path):
    # images directly in train/, no class folders
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8)).save(flat / "train" / f"{i}.jpg")
    with pytest.raises(DataError, match=r"no class folders found under .*DATA.PATH_TO_DATA_DIR=.*it holds 3 image "
                                        r"file\(s\) directly: put them in one sub-folder per class"):
        dataset(flat, tmp_path)
    data = make_image_folder(train_counts=(1, 1, 1), val_counts=(1, 1, 1))
    with pytest.raises(DataError) as e:
        dataset(data, tmp_path, split="test")
    assert str(e.value) == f"split folder not found: {data / 'test'} (DATA.PATH_TO_DATA_DIR={data}, split 'test')"
    with pytest.raises(DataError) as e:
        dataset(data, tmp_path, MODEL__NUM_CLASSES=2)
    assert str(e.value) == (f"{data / 'train'} has 3 class folders but MODEL.NUM_CLASSES is 2; "
                            f"set MODEL.NUM_CLASSES to at least 3")
    (data / "val" / "wolf").mkdir()
    Image.new("RGB", (8, 8)).save(data / "val" / "wolf" / "0.png")
    with pytest.raises(DataError) as e:
        dataset(data, tmp_path, split="val")
    assert str(e.value) == (f"class folder(s) in {data / 'val'} not among the 3 classes of {data / 'train'}: wolf; "
                            f"add a folder {data / 'train'}/<class> for it or remove it")


def test_digits_errors_name_the_key(tmp_path):
    base = ["OUTPUT_DIR", str(tmp_path), "TRAIN.DATASET", "digits", "TEST.DATASET", "digits",
            "DATA_LOADER.NUM_WORKERS", "0"]
    cfg = load_config("", base + ["MODEL.NUM_CLASSES", "10"])
    with pytest.raises(DataError, match=r"not 'minival' \(TEST.SPLIT\)"):
        build_dataset("digits", cfg, "minival")
    ds = build_dataset("digits", cfg, "val")
    image, label = ds[0]
    assert len(ds) == 300 and image.shape[0] == 3 and 0 <= label < 10
    cfg = load_config("", base + ["MODEL.NUM_CLASSES", "9"])
    with pytest.raises(DataError, match="has 10 classes but MODEL.NUM_CLASSES is 9"):
        build_dataset("digits", cfg, "train")


def test_bad_files_end_to_end_are_skipped_and_counted(make_image_folder, tmp_path, run_net):
    # 20 good + 4 bad train images (batch 8: nothing dropped by drop_last), 7 good + 1 bad val images;
    # hidden junk is not data and not counted.
    data = make_image_folder(train_counts=(7, 7, 6), val_counts=(3, 2, 2))
    zebra = data / "train" / "zebra"
    png_claiming_size(zebra / "bomb.png", 20000, 20000)
    truncated_jpeg(zebra / "truncated.jpg")
    (zebra / "folder.jpg").mkdir()
    os.symlink(zebra / "gone.png", zebra / "broken.png")
    (zebra / "._img_00.png").write_bytes(b"\x00\x05\x16\x07")
    (data / "train" / ".ipynb_checkpoints").mkdir()
    val_bomb = data / "val" / "dog" / "bomb.png"
    png_claiming_size(val_bomb, 20000, 20000)
    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(data, out, SOLVER__MAX_EPOCH=1))
    assert rc == 0
    log = (out / "stdout.log").read_text()
    assert str(zebra / "bomb.png") in log and str(val_bomb) in log and "MAX_IMAGE_PIXELS" in log
    assert [r["skipped_images"] for r in h.records(out, "train_epoch")] == [4]
    for r in h.records(out, "val") + h.records(out, "test_final"):
        assert r["skipped_images"] == 1 and r["num_images"] == 7
