"""Tiny datasets written in the exact published on-disk layouts, with planted problems.

Each `write_*` returns a dict of the paths it wrote; `BAD_*` dicts map the file a checker
or reader must name to a phrase its message must contain.
"""

from __future__ import annotations

import io
import json
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


# === detection ===

# PASCAL VOC objects per image: (name, xmin, ymin, xmax, ymax, difficult, truncated), the devkit's
# 1-based inclusive pixel indices. Image sizes (H, W) as VOC_DET_SIZES.
VOC_DET_SIZES = ((40, 56), (48, 40), (36, 36), (44, 52))
VOC_DET_OBJECTS = (
    (("dog", 1, 1, 56, 40, 0, 1), ("person", 10, 5, 20, 30, 1, 0)),  # a whole-image box; a difficult one
    (("car", 5, 6, 15, 16, 0, 0), ("car", 20, 20, 20, 25, 0, 1), ("bicycle", 3, 30, 30, 45, 1, 0)),  # 1 px wide
    (("tvmonitor", 2, 2, 30, 30, 1, 0),),  # only a difficult object
    (("aeroplane", 3, 4, 50, 20, 0, 0), ("horse", 30, 22, 52, 44, 0, 1), ("pottedplant", 1, 30, 8, 44, 0, 0)),
)


def voc_xml(filename, size, objects, *, database="The VOC2007 Database"):
    """A PASCAL VOC annotation file's text, in the devkit's element order."""
    h, w = size
    parts = [f"<annotation>\n\t<folder>VOC2007</folder>\n\t<filename>{filename}</filename>\n"
             f"\t<source>\n\t\t<database>{database}</database>\n\t\t<annotation>PASCAL VOC2007</annotation>\n"
             f"\t</source>\n\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n"
             f"\t</size>\n\t<segmented>0</segmented>\n"]
    for name, xmin, ymin, xmax, ymax, difficult, truncated in objects:
        parts.append(f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
                     f"\t\t<truncated>{truncated}</truncated>\n\t\t<difficult>{difficult}</difficult>\n"
                     f"\t\t<bndbox>\n\t\t\t<xmin>{xmin}</xmin>\n\t\t\t<ymin>{ymin}</ymin>\n"
                     f"\t\t\t<xmax>{xmax}</xmax>\n\t\t\t<ymax>{ymax}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    return "".join(parts) + "</annotation>\n"


def write_voc_detection(root, *, seed=0):
    """VOCdevkit/VOC2007 detection layout: JPEGImages/, Annotations/*.xml (VOC_DET_OBJECTS),
    ImageSets/Main/{train,val,trainval}.txt and the devkit's per-class dog_train.txt."""
    rng = np.random.default_rng(seed)
    voc = os.path.join(root, "VOCdevkit", "VOC2007")
    for sub in ("JPEGImages", "Annotations", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(voc, sub), exist_ok=True)
    names = [f"{i + 1:06d}" for i in range(len(VOC_DET_OBJECTS))]
    for name, size, objects in zip(names, VOC_DET_SIZES, VOC_DET_OBJECTS):
        save_jpeg(os.path.join(voc, "JPEGImages", name + ".jpg"), image_array(rng, *size))
        with open(os.path.join(voc, "Annotations", name + ".xml"), "w") as f:
            f.write(voc_xml(name + ".jpg", size, objects))
    main = os.path.join(voc, "ImageSets", "Main")
    for split, members in (("train", names[:2]), ("val", names[2:]), ("trainval", names)):
        with open(os.path.join(main, split + ".txt"), "w") as f:
            f.write("".join(m + "\n" for m in members))
    with open(os.path.join(main, "dog_train.txt"), "w") as f:
        f.write(f"{names[0]}  1\n{names[1]} -1\n")
    return {"root": voc, "names": names}


def plant_voc_detection_problems(voc):
    """Add broken images / annotations to a write_voc_detection dataset, listed in ImageSets/Main/bad.txt
    (and appended to trainval.txt); returns {file the reader and checker must name: phrase}."""
    rng = np.random.default_rng(1)
    jpeg, ann = os.path.join(voc, "JPEGImages"), os.path.join(voc, "Annotations")
    good = (("cat", 2, 3, 20, 25, 0, 0),)
    expected = {}

    def pair(name, objects=good, size=(32, 40), xml_size=None):
        save_jpeg(os.path.join(jpeg, name + ".jpg"), image_array(rng, *size))
        with open(os.path.join(ann, name + ".xml"), "w") as f:
            f.write(voc_xml(name + ".jpg", xml_size or size, objects))

    save_jpeg(os.path.join(jpeg, "bad_missing_xml.jpg"), image_array(rng, 32, 40))
    expected[os.path.join(ann, "bad_missing_xml.xml")] = "missing"
    with open(os.path.join(ann, "bad_missing_image.xml"), "w") as f:
        f.write(voc_xml("bad_missing_image.jpg", (32, 40), good))
    expected[os.path.join(jpeg, "bad_missing_image.jpg")] = "missing"
    pair("bad_unparsable")
    with open(os.path.join(ann, "bad_unparsable.xml"), "w") as f:
        f.write("<annotation>\n\t<object>\n\t\t<name>cat</name>\n")  # cut off mid-file
    expected[os.path.join(ann, "bad_unparsable.xml")] = "cannot be parsed as XML"
    pair("bad_unknown_class", (("unicorn", 2, 3, 20, 25, 0, 0),))
    expected[os.path.join(ann, "bad_unknown_class.xml")] = "unknown class name 'unicorn'"
    pair("bad_inverted_box", (("cat", 20, 3, 10, 25, 0, 0),))
    expected[os.path.join(ann, "bad_inverted_box.xml")] = "xmax < xmin"
    pair("bad_outside_box", (("cat", 2, 3, 41, 25, 0, 0),))  # the image is 40 wide: xmax runs 1..40
    expected[os.path.join(ann, "bad_outside_box.xml")] = "outside the image"
    pair("bad_too_many", tuple(("cat", 1 + i % 30, 1, 2 + i % 30, 5, 0, 0) for i in range(101)))
    expected[os.path.join(ann, "bad_too_many.xml")] = "101 objects but max_boxes=100"
    pair("bad_size_mismatch", xml_size=(30, 40))
    expected[os.path.join(jpeg, "bad_size_mismatch.jpg")] = "says 30x40"
    pair("bad_truncated_jpeg")
    truncate(os.path.join(jpeg, "bad_truncated_jpeg.jpg"))
    expected[os.path.join(jpeg, "bad_truncated_jpeg.jpg")] = "truncated"

    names = sorted({os.path.splitext(os.path.basename(p))[0] for p in expected})
    main = os.path.join(voc, "ImageSets", "Main")
    with open(os.path.join(main, "trainval.txt"), "a") as f:
        f.write("".join(n + "\n" for n in names))
    with open(os.path.join(main, "bad.txt"), "w") as f:
        f.write("".join(n + "\n" for n in names))
    return expected


COCO_CATEGORIES = ({"id": 1, "name": "person", "supercategory": "person"},
                   {"id": 3, "name": "car", "supercategory": "vehicle"},
                   {"id": 18, "name": "dog", "supercategory": "animal"})


def write_coco(root, *, seed=0):
    """COCO layout: root/val2017/*.jpg and root/annotations/instances_val2017.json.

    Images (listed out of id order): id 42 a.jpg 40x56 (a person, a dog over the whole image,
    a crowd region), id 7 b.jpg 48x40 (a car, a zero-height car, a car 0.4 px past the right
    edge), id 13 c.jpg 36x36 (no annotations). Category ids 1, 3, 18 (COCO's person, car, dog).
    """
    rng = np.random.default_rng(seed)
    images_dir = os.path.join(root, "val2017")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    images = [{"id": 42, "file_name": "a.jpg", "height": 40, "width": 56},
              {"id": 7, "file_name": "b.jpg", "height": 48, "width": 40},
              {"id": 13, "file_name": "c.jpg", "height": 36, "width": 36}]
    for im in images:
        save_jpeg(os.path.join(images_dir, im["file_name"]), image_array(rng, im["height"], im["width"]))
    annotations = [
        {"id": 1, "image_id": 42, "category_id": 1, "bbox": [10.5, 5.0, 20.0, 30.25], "area": 605.0, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 18, "bbox": [0, 0, 56, 40], "area": 2240.0, "iscrowd": 0},
        {"id": 3, "image_id": 42, "category_id": 1, "bbox": [30, 20, 20, 15], "area": 300.0, "iscrowd": 1},
        {"id": 4, "image_id": 7, "category_id": 3, "bbox": [5, 6, 10, 10], "area": 100.0, "iscrowd": 0},
        {"id": 5, "image_id": 7, "category_id": 3, "bbox": [1, 1, 5, 0.0], "area": 0.0, "iscrowd": 0},
        {"id": 6, "image_id": 7, "category_id": 3, "bbox": [30, 20, 10.4, 8], "area": 83.2, "iscrowd": 0},
    ]
    path = os.path.join(root, "annotations", "instances_val2017.json")
    with open(path, "w") as f:
        json.dump({"info": {"description": "kseg test"}, "images": images, "annotations": annotations,
                   "categories": list(COCO_CATEGORIES)}, f)
    return {"root": root, "images": images_dir, "annotations": path}


def plant_coco_problems(coco):
    """Rewrite a write_coco JSON with broken entries; returns {file the reader must name: phrase}."""
    rng = np.random.default_rng(2)
    with open(coco["annotations"]) as f:
        data = json.load(f)
    images_dir = coco["images"]
    expected = {}
    extra = [(100, "unknown_category.jpg", {"category_id": 2, "bbox": [1, 1, 5, 5]}, "category_id 2 is not in"),
             (101, "outside.jpg", {"category_id": 1, "bbox": [30, 1, 20, 5]}, "outside the 32x40"),
             (102, "negative.jpg", {"category_id": 1, "bbox": [3, 1, -2, 5]}, "negative width"),
             (103, "size_mismatch.jpg", {"category_id": 1, "bbox": [1, 1, 5, 5]}, "says 32x44")]
    for iid, name, ann, phrase in extra:
        save_jpeg(os.path.join(images_dir, name), image_array(rng, 32, 40))
        data["images"].append({"id": iid, "file_name": name, "height": 32, "width": 44 if iid == 103 else 40})
        data["annotations"].append({"id": 1000 + iid, "image_id": iid, "iscrowd": 0, "area": 1.0, **ann})
        expected[os.path.join(images_dir, name)] = phrase
    data["images"].append({"id": 104, "file_name": "missing.jpg", "height": 32, "width": 40})
    expected[os.path.join(images_dir, "missing.jpg")] = "missing"
    data["annotations"].append({"id": 2000, "image_id": 999, "category_id": 1, "bbox": [1, 1, 2, 2], "iscrowd": 0})
    expected[coco["annotations"]] = "image_id 999 is not in images"
    with open(coco["annotations"], "w") as f:
        json.dump(data, f)
    return expected
