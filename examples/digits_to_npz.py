"""Convert scikit-learn's 8×8 handwritten digits to the pipeline's ``npz`` format.

The data are the real UCI "optical recognition of handwritten digits" images that scikit-learn ships
(1,797 images, 8×8, pixel values 0–16), so this works offline. They are scaled to uint8 0–255
(round(v · 255 / 16)) and split, stratified by digit, into a training pool and a test set; the
pipeline carves its validation split from the training pool (``n_val``).

    python examples/digits_to_npz.py                     # → data/digits.npz (configs/digits.yaml)
    python examples/digits_to_npz.py --out /tmp/d.npz --test-fraction 0.25 --seed 0

Writes ``x_train`` (N×8×8 uint8), ``y_train`` (int64), ``x_test``, ``y_test``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def digits_arrays(test_fraction: float = 0.25, seed: int = 0) -> dict[str, np.ndarray]:
    """The four arrays: uint8 images (0–255) and int64 labels, stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0–16 → 0–255
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=test_fraction,
                                                        stratify=labels, random_state=seed)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def convert(out: str | Path, test_fraction: float = 0.25, seed: int = 0) -> Path:
    """Write the npz atomically (temporary file + rename) and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays = digits_arrays(test_fraction, seed)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "data" / "digits.npz"), help="output .npz (default data/digits.npz)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="fraction of the images in the test set")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    args = p.parse_args(argv)
    path = convert(args.out, args.test_fraction, args.seed)
    with np.load(path, allow_pickle=False) as npz:
        sizes = {k: npz[k].shape for k in npz.files}
    print(f"wrote {path}: " + ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in sizes.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
