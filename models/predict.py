"""Segment your own images: colour masks, overlays and label PNGs from released, mmseg or trainer weights.

    python -m models.predict --weights DANet101.pth.tar --arch danet101_cityscapes --input photos/ --out masks/
    python -m models.predict --checkpoint runs/demo/best.pth --input 'shots/*.jpg' --out masks/ --mode whole
    python -m models.predict --weights DANet101.pth.tar --input leftImg8bit/test --out results/ --format cityscapes

For each image ``<dir>/<name>.<ext>`` (``--input``: files, folders searched recursively, or glob
patterns; the folders below the inputs' common folder are kept under ``--out``) it writes
``<name>_color.png`` (the classes in the dataset's palette), ``<name>_overlay.png`` (that mask
over the image, ``--opacity``) and ``<name>_labels.png`` (8-bit class indices). ``--format
cityscapes`` writes only ``<city>_<seq>_<frame>_labelIds.png`` with Cityscapes label IDs (not
train IDs), the file names the Cityscapes benchmark matches (``<city>_<seq>_<frame>*.png``).

The test-time protocol (whole image or windows, scales, flip, resize) defaults to the arch's.
Grayscale, palette, RGBA, CMYK and 16-bit images are converted to 8-bit RGB with a warning;
unreadable files are skipped with a warning and counted. Files are written atomically (a
temporary file renamed) and never over an input. The exit status is 1 when nothing was written.
"""
import argparse
import glob
import io
import os
import re
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from .checkpoints import atomic_write
from .data import normalize
from .evaluate import add_inference_options, describe_protocol, inference_setup, predict
from .readers import cityscapes_label_ids

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# The Cityscapes image id <city>_<sequence>_<frame> that the benchmark matches predictions by.
_CITYSCAPES_ID = re.compile(r"^([a-z_]+_\d{6}_\d{6})(_leftImg8bit)?$")


class UnreadableImage(Exception):
    pass


def find_images(inputs):
    """(sorted unique image paths, [inputs that matched nothing]) for files, folders (recursive:
    files with an image extension) and glob patterns."""
    found, empty = set(), []
    for item in inputs:
        if os.path.isdir(item):
            hits = [os.path.join(root, f) for root, _, files in os.walk(item) for f in files
                    if f.lower().endswith(IMAGE_EXTS)]
        elif os.path.isfile(item):
            hits = [item]
        else:
            hits = [p for p in glob.glob(item, recursive=True) if os.path.isfile(p)]
        if not hits:
            empty.append(item)
        found.update(os.path.normpath(h) for h in hits)
    return sorted(found), empty


def read_image(path):
    """(uint8 RGB tensor [3, H, W], what was converted or None). Raises UnreadableImage."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            rawmode = im.tile[0][3] if im.tile and isinstance(im.tile[0][3], str) else ""
            im = ImageOps.exif_transpose(im)  # as viewers show it
            mode, note = im.mode, None
            if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit (or wider) grayscale
                arr = np.asarray(im, dtype=np.float64)
                arr = np.clip(np.round(arr / 257 if arr.max(initial=0) > 255 else arr), 0, 255).astype(np.uint8)
                arr = np.repeat(arr[..., None], 3, axis=2)
                note = f"{mode} (16-bit grayscale) converted to 8-bit RGB"
            else:
                if mode != "RGB":
                    what = {"L": "grayscale", "LA": "grayscale with alpha", "1": "1-bit", "P": "palette",
                            "PA": "palette with alpha", "RGBA": "RGBA (alpha ignored)", "CMYK": "CMYK"}.get(mode, mode)
                    note = f"{what} converted to RGB"
                elif "16" in rawmode:  # Pillow decodes 16-bit-per-channel RGB to 8 bits
                    note = "16-bit RGB reduced to 8 bits per channel"
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous(), note


def _png_bytes(array, mode):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def output_files(labels, img, colors, opacity, fmt, stem):
    """{file name: PNG bytes} of one image's prediction (``labels`` [H, W] int, ``img`` uint8 [3, H, W])."""
    if fmt == "cityscapes":
        m = _CITYSCAPES_ID.match(stem)
        return {f"{m.group(1) if m else stem}_labelIds.png": _png_bytes(cityscapes_label_ids(labels).numpy(), "L")}
    color = colors[labels.long()]  # [H, W, 3]
    rgb = img.permute(1, 2, 0).float()
    overlay = ((1 - opacity) * rgb + opacity * color.float()).round().clamp(0, 255).to(torch.uint8)
    return {f"{stem}_color.png": _png_bytes(color.numpy(), "RGB"),
            f"{stem}_overlay.png": _png_bytes(overlay.numpy(), "RGB"),
            f"{stem}_labels.png": _png_bytes(labels.to(torch.uint8).numpy(), "L")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_inference_options(p)
    p.add_argument("--input", nargs="+", required=True, metavar="IMAGE|DIR|GLOB")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--format", choices=("default", "cityscapes"), default="default",
                   help="cityscapes: only label-ID PNGs named for the Cityscapes benchmark")
    p.add_argument("--opacity", type=float, default=0.5, help="of the colour mask in the overlay (0..1)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not 0 <= args.opacity <= 1:
        p.error(f"--opacity must be in [0, 1], got {args.opacity}")

    def warn(msg):
        tqdm.write(f"warning: {msg}", file=sys.stderr)

    paths, empty = find_images(args.input)
    for item in empty:
        warn(f"{item}: no image found")
    if not paths:
        print("error: no input images", file=sys.stderr)
        return 1
    model, arch, _, kw, amp = inference_setup(args)
    if model.nclass > 256:
        p.error(f"the model has {model.nclass} classes: more than an 8-bit label PNG holds")
    if args.format == "cityscapes" and not (arch.dataset == "cityscapes" and model.nclass == 19):
        p.error(f"--format cityscapes needs a Cityscapes model (19 classes); {arch.name} is {arch.dataset}")
    device, norm, colors = torch.device(args.device), arch.normalization(), arch.palette()
    inputs = {os.path.realpath(x) for x in paths}
    root = os.path.commonpath([os.path.dirname(os.path.abspath(x)) for x in paths])
    print(f"{arch.name if args.weights else args.checkpoint}: {len(paths)} images, {describe_protocol(kw)}, "
          f"{args.device}" + (f", autocast {args.amp}" if amp else ""), file=sys.stderr)

    written, files, bad, refused = 0, 0, [], []
    t0 = time.perf_counter()
    bar = tqdm(paths, unit="img", disable=args.no_progress, dynamic_ncols=True, file=sys.stderr)
    for path in bar:
        try:
            img, note = read_image(path)
        except UnreadableImage as e:
            warn(f"{path}: skipped, cannot be read as an image ({e})")
            bad.append(path)
            continue
        if note:
            warn(f"{path}: {note}")
        x = normalize(img, **norm)[None].to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            labels = predict(model, x, model.nclass, **kw).argmax(1)[0].cpu()
        stem = os.path.splitext(os.path.basename(path))[0]
        if args.format == "cityscapes" and not _CITYSCAPES_ID.match(stem):
            warn(f"{path}: not a Cityscapes image name (<city>_<seq>_<frame>_leftImg8bit.png); the benchmark "
                 "will not match its prediction")
        out_dir = os.path.normpath(os.path.join(args.out, os.path.relpath(os.path.dirname(os.path.abspath(path)), root)))
        outputs = {os.path.join(out_dir, name): data
                   for name, data in output_files(labels, img, colors, args.opacity, args.format, stem).items()}
        clash = [o for o in outputs if os.path.realpath(o) in inputs]
        if clash:
            warn(f"{path}: skipped, its output {clash[0]} is an input image (choose another --out)")
            refused.append(path)
            continue
        os.makedirs(out_dir, exist_ok=True)
        for out_path, data in outputs.items():
            atomic_write(out_path, lambda f, data=data: f.write(data))
        written += 1
        files += len(outputs)
    bar.close()
    dt = max(time.perf_counter() - t0, 1e-9)
    print(f"wrote {files} files for {written} of {len(paths)} images to {args.out} in {dt:.1f} s "
          f"({written / dt:.2f} images/s)", file=sys.stderr)
    if bad:
        print(f"skipped {len(bad)} unreadable file(s): " + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""),
              file=sys.stderr)
    if refused:
        print(f"skipped {len(refused)} image(s) whose outputs would overwrite inputs", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
