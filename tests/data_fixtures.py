"""Tiny datasets written in the exact published on-disk layouts, with planted problems.

Each `write_*` returns a dict of the paths it wrote; `BAD_*` dicts map the file a checker
or reader must name to a phrase its message must contain.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from kseg.data.palette import voc_palette, write_label


def image_array(rng, h, w):
    """A smooth-ish random RGB image (JPEG-friendly)."""
    coarse = rng.integers(0, 256, size=(max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR))


def label_array(rng, h, w, values=(0, 3, 7, 15)):
    """Blocks of the given class values with a 255 band between them (VOC-like)."""
    label = np.full((h, w), values[0], np.uint8)
    label[h // 4: 3 * h // 4, w // 4: w // 2] = values[1 % len(values)]
    label[h // 3: h - 2, w // 2: w - 3] = values[2 % len(values)]
    label[: h // 5, : w // 3] = values[3 % len(values)]
    label[h // 4 - 1: h // 4 + 1, w // 4: w // 2] = 255
    label[h // 3: h - 2, w // 2] = 255
    return label


def save_jpeg(path, array, mode="RGB"):
    im = Image.fromarray(array)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path, "JPEG", quality=92)


def truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def corrupt_huffman_table(path):
    """Overwrite the first DHT segment's 16 code counts with 0xFF (libjpeg: "Bogus Huffman table")."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.index(b"\xff\xc4") + 5  # marker (2), length (2), class/id (1), then the counts
    data[at: at + 16] = b"\xff" * 16
    with open(path, "wb") as f:
        f.write(bytes(data))


def write_voc(root, *, n=4, sizes=((40, 56), (48, 40), (36, 36), (44, 52)), values=(0, 3, 7, 15),
              labels="SegmentationClass", gray_index=1, cmyk_index=2, seed=0):
    """VOCdevkit/VOC2012 layout: JPEGImages/, <labels>/ palette PNGs, ImageSets/Segmentation/{train,val}.txt.

    Image `gray_index` is a grayscale JPEG and `cmyk_index` a CMYK JPEG (valid, converted).
    """
    rng = np.random.default_rng(seed)
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    for sub in ("JPEGImages", labels, os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(voc, sub), exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(n)]
    for i, name in enumerate(names):
        h, w = sizes[i % len(sizes)]
        mode = "L" if i == gray_index else "CMYK" if i == cmyk_index else "RGB"
        save_jpeg(os.path.join(voc, "JPEGImages", name + ".jpg"), image_array(rng, h, w), mode)
        write_label(os.path.join(voc, labels, name + ".png"), label_array(rng, h, w, values))
    half = max(n // 2, 1)
    for split, members in (("train", names[:half]), ("val", names[half:]), ("trainval", names)):
        with open(os.path.join(voc, "ImageSets", "Segmentation", split + ".txt"), "w") as f:
            f.write("".join(m + "\n" for m in members))
    return {"root": voc, "names": names}


def plant_voc_problems(voc):
    """Add broken pairs to a write_voc dataset's trainval list; returns {file: phrase} expected."""
    rng = np.random.default_rng(1)
    jpeg, seg = os.path.join(voc, "JPEGImages"), os.path.join(voc, "SegmentationClass")
    expected = {}

    def pair(name, h=32, w=40):
        save_jpeg(os.path.join(jpeg, name + ".jpg"), image_array(rng, h, w))
        write_label(os.path.join(seg, name + ".png"), label_array(rng, h, w))

    pair("bad_truncated_jpeg")
    truncate(os.path.join(jpeg, "bad_truncated_jpeg.jpg"))
    expected[os.path.join(jpeg, "bad_truncated_jpeg.jpg")] = "truncated"

    pair("bad_corrupt_jpeg")  # complete, but its Huffman table is garbage: the decoder itself fails
    corrupt_huffman_table(os.path.join(jpeg, "bad_corrupt_jpeg.jpg"))
    expected[os.path.join(jpeg, "bad_corrupt_jpeg.jpg")] = "cannot be decoded"

    pair("bad_colour_mask")
    colours = voc_palette()[label_array(rng, 32, 40)]
    Image.fromarray(colours).save(os.path.join(seg, "bad_colour_mask.png"))
    expected[os.path.join(seg, "bad_colour_mask.png")] = "colour"

    pair("bad_binary_mask")
    binary = np.where(label_array(rng, 32, 40) > 0, 255, 0).astype(np.uint8)
    Image.fromarray(binary, "L").save(os.path.join(seg, "bad_binary_mask.png"))
    expected[os.path.join(seg, "bad_binary_mask.png")] = "0/255"

    pair("bad_out_of_range")
    write_label(os.path.join(seg, "bad_out_of_range.png"), label_array(rng, 32, 40, (0, 3, 30, 7)))
    expected[os.path.join(seg, "bad_out_of_range.png")] = "30"

    pair("bad_size_mismatch")
    write_label(os.path.join(seg, "bad_size_mismatch.png"), label_array(rng, 30, 40))
    expected[os.path.join(jpeg, "bad_size_mismatch.jpg")] = "30x40"

    save_jpeg(os.path.join(jpeg, "bad_missing_label.jpg"), image_array(rng, 32, 40))
    expected[os.path.join(seg, "bad_missing_label.png")] = "missing"

    pair("bad_truncated_png")
    truncate(os.path.join(seg, "bad_truncated_png.png"), 0.6)
    expected[os.path.join(seg, "bad_truncated_png.png")] = "truncated"

    pair("bad_not_an_image")
    with open(os.path.join(jpeg, "bad_not_an_image.jpg"), "wb") as f:
        f.write(b"<html>404 Not Found</html>" * 4)
    expected[os.path.join(jpeg, "bad_not_an_image.jpg")] = "not a JPEG"

    names = sorted({os.path.splitext(os.path.basename(p))[0] for p in expected})
    with open(os.path.join(voc, "ImageSets", "Segmentation", "trainval.txt"), "a") as f:
        f.write("".join(n + "\n" for n in names))
    with open(os.path.join(voc, "ImageSets", "Segmentation", "bad.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    return expected


def write_pets(root, *, n=4, seed=0):
    """Oxford-IIIT Pet: images/*.jpg, annotations/trimaps/*.png (1 pet, 2 background, 3 border),
    annotations/{trainval,test}.txt. Image 1 is an RGBA PNG saved under a .jpg name, as in the
    real dataset."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations", "trimaps"), exist_ok=True)
    names = [f"Abyssinian_{i + 1}" for i in range(n)]
    for i, name in enumerate(names):
        h, w = 40 + 4 * i, 48
        img = image_array(rng, h, w)
        if i == 1:
            Image.fromarray(img).convert("RGBA").save(os.path.join(root, "images", name + ".jpg"), "PNG")
        else:
            save_jpeg(os.path.join(root, "images", name + ".jpg"), img)
        trimap = np.full((h, w), 2, np.uint8)
        trimap[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 3
        trimap[h // 4 + 2: 3 * h // 4 - 2, w // 4 + 2: 3 * w // 4 - 2] = 1
        Image.fromarray(trimap, "L").save(os.path.join(root, "annotations", "trimaps", name + ".png"))
    header = "#Image CLASS-ID SPECIES BREED ID\n"
    with open(os.path.join(root, "annotations", "trainval.txt"), "w") as f:
        f.write(header + "".join(f"{m} 1 1 1\n" for m in names[: n - 1]))
    with open(os.path.join(root, "annotations", "test.txt"), "w") as f:
        f.write("".join(f"{m} 1 1 1\n" for m in names[n - 1:]))
    return {"root": root, "names": names}


def write_folder(root, *, seed=0):
    """Generic images/ + masks/ by stem: a.jpg, b.png, c.jpg (index masks); an orphan image and mask."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    for stem, ext in (("a", ".jpg"), ("b", ".png"), ("c", ".jpg")):
        img = image_array(rng, 32, 32)
        if ext == ".jpg":
            save_jpeg(os.path.join(root, "images", stem + ext), img)
        else:
            Image.fromarray(img).save(os.path.join(root, "images", stem + ext))
        Image.fromarray(label_array(rng, 32, 32, (0, 1, 2, 1)), "L").save(os.path.join(root, "masks", stem + ".png"))
    return {"root": root}


def write_edges(root, *, n=3, seed=0):
    """BSDS500 / HED: a list file of 'image edge_map' pairs, relative to root."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "edges"), exist_ok=True)
    lines = []
    for i in range(n):
        save_jpeg(os.path.join(root, "images", f"{i}.jpg"), image_array(rng, 40, 48))
        edge = np.zeros((40, 48), np.uint8)
        edge[10, :] = 255
        edge[:, 20] = 128
        Image.fromarray(edge, "L").save(os.path.join(root, "edges", f"{i}.png"))
        lines.append(f"images/{i}.jpg edges/{i}.png\n")
    with open(os.path.join(root, "train_pair.lst"), "w") as f:
        f.writelines(lines)
    return {"root": root, "list": os.path.join(root, "train_pair.lst")}


def edge_picture(rng, h, w):
    """(RGB image, binary edge map 0/255) of a random rectangle on a smooth background."""
    top, left = int(rng.integers(4, h // 3)), int(rng.integers(4, w // 3))
    bottom, right = int(rng.integers(2 * h // 3, h - 4)), int(rng.integers(2 * w // 3, w - 4))
    image = image_array(rng, h, w) // 2
    image[top:bottom, left:right] += 120
    edge = np.zeros((h, w), np.uint8)
    edge[top, left:right] = edge[bottom - 1, left:right] = 255
    edge[top:bottom, left] = edge[top:bottom, right - 1] = 255
    return image, edge


def write_edge_list(root, *, n=3, size=(40, 48), name="train_pair.lst", seed=0):
    """The HED release's BSDS layout: images/*.jpg, binary edge PNGs (0/255) in gt/, and a list of
    'images/i.jpg gt/i.png' lines (paths relative to the list's folder)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "gt"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    lines = []
    for i in range(n):
        image, edge = edge_picture(rng, *size)
        save_jpeg(os.path.join(root, "images", f"{i}.jpg"), image)
        Image.fromarray(edge, "L").save(os.path.join(root, "gt", f"{i}.png"))
        lines.append(f"images/{i}.jpg gt/{i}.png\n")
    with open(os.path.join(root, name), "w") as f:
        f.writelines(lines)
    return {"root": root, "list": os.path.join(root, name),
            "images": [os.path.join(root, "images", f"{i}.jpg") for i in range(n)]}


def write_classes(root, *, seed=0):
    """One folder per class: cat/ (RGB, grayscale, CMYK JPEGs) and dog/ (RGB JPEG, PNG)."""
    rng = np.random.default_rng(seed)
    for cls, files in (("cat", [("0.jpg", "RGB"), ("1.jpg", "L"), ("2.jpg", "CMYK")]),
                       ("dog", [("0.jpg", "RGB"), ("1.png", "PNG")])):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for name, mode in files:
            img = image_array(rng, 30 + 5 * len(name), 40)
            if mode == "PNG":
                Image.fromarray(img).save(os.path.join(root, cls, name))
            else:
                save_jpeg(os.path.join(root, cls, name), img, mode)
    return {"root": root}


def png_bytes(array, mode, palette=None, bits=None):
    im = Image.fromarray(array, mode)
    if palette is not None:
        im.putpalette(palette)
    buf = io.BytesIO()
    im.save(buf, "PNG", **({"bits": bits} if bits else {}))
    return buf.getvalue()


CLASS_COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def _class_image(rng, h, w, colour):
    """A noisy image tinted with its class's colour (so a tiny classifier has something to learn)."""
    noise = image_array(rng, h, w).astype(np.int16) // 4
    return np.clip(np.asarray(colour, np.int16) + noise - 32, 0, 255).astype(np.uint8)


def write_class_splits(root, *, classes=("cat", "dog", "fox"), per_class=4, size=(40, 48),
                       splits=("train", "test"), seed=0):
    """ImageNet-style class folders per split: ROOT/SPLIT/CLASS/i.jpg (3 classes x 4 images of 40x48)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            os.makedirs(os.path.join(root, split, name), exist_ok=True)
            for i in range(per_class):
                save_jpeg(os.path.join(root, split, name, f"{i}.jpg"), _class_image(rng, *size, CLASS_COLOURS[c % 3]))
    return {"root": root, "classes": list(classes)}


def write_class_list(root, *, classes=("cat", "dog", "fox"), per_class=4, size=(40, 48), splits=("train", "test"),
                     seed=0, classes_txt=True):
    """mmpretrain's CustomDataset form: ROOT/SPLIT.txt of 'images/SPLIT/i.jpg LABEL' lines, ROOT/classes.txt."""
    rng = np.random.default_rng(seed)
    lists = {}
    for split in splits:
        os.makedirs(os.path.join(root, "images", split), exist_ok=True)
        lines = []
        for c in range(len(classes)):
            for i in range(per_class):
                rel = f"images/{split}/{c}_{i}.jpg"
                save_jpeg(os.path.join(root, rel), _class_image(rng, *size, CLASS_COLOURS[c % 3]))
                lines.append(f"{rel} {c}\n")
        lists[split] = os.path.join(root, f"{split}.txt")
        with open(lists[split], "w") as f:
            f.writelines(lines)
    if classes_txt:
        with open(os.path.join(root, "classes.txt"), "w") as f:
            f.write("".join(f"{name}\n" for name in classes))
    return {"root": root, "classes": list(classes), "lists": lists}
