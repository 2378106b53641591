"""`fastneg make-data`: the embedded shapes dataset."""
from __future__ import annotations

from fastneg.data.photos import DEFAULT_IMAGES_PER_CLASS as PHOTOS_PER_CLASS
from fastneg.data.synthetic import COLOUR_MODES, SHAPES, SPLITS, DatasetSpec, make_dataset


def register(sub) -> None:
    m = sub.add_parser("make-data", help="generate the embedded shapes dataset (ImageFolder of JPEGs)",
                       description="Generate the shapes dataset: label = shape, texture = a "
                                   "shortcut. Writes OUT/train, OUT/val, OUT/conflict, OUT/outline, "
                                   "each an ImageFolder with a metadata.csv.")
    m.add_argument("--out", required=True, help="output directory")
    m.add_argument("--images-per-class", type=int, default=None,
                   help="training images per class; the other splits get 20%% of it (default 500; "
                        f"with --photos {PHOTOS_PER_CLASS})")
    m.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    m.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    m.add_argument("--p-dominant", type=float, default=0.8,
                   help="probability that a train/val image carries its class's dominant texture "
                        "(default 0.8)")
    m.add_argument("--colour", choices=COLOUR_MODES, default="grey",
                   help="grey: dark/light grey textures on grey backgrounds; palette: texture "
                        "colours from four pairs shared by all classes; random: random colours "
                        "per image (identify the image; old design) (default grey)")
    m.add_argument("--independent", action="store_true",
                   help="train/val: draw shape, texture family and (palette) colour "
                        "independently and uniformly, for per-factor read-outs "
                        "(--p-dominant is then unused there)")
    m.add_argument("--imagenet-like", action="store_true",
                   help="write ~500x375 JPEG q90 images (for throughput benchmarks)")
    m.add_argument("--photos", action="store_true",
                   help="instead: OUT/train of ImageNet-sized JPEG crops of scikit-image's sample "
                        "photos (fastneg.data.photos; for throughput benchmarks)")
    m.add_argument("--workers", type=int, default=None, help="processes (default: available cores)")
    m.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    m.set_defaults(func=run)


def run(args) -> None:
    if args.photos:
        from fastneg.data import photos
        return photos.run(args)
    per_class = 500 if args.images_per_class is None else args.images_per_class
    spec = DatasetSpec(images_per_class=per_class, size=args.size, seed=args.seed,
                       p_dominant=args.p_dominant, imagenet_like=args.imagenet_like,
                       colour=args.colour, independent=args.independent)
    out = make_dataset(args.out, spec, force=args.force, workers=args.workers)
    counts = ", ".join(f"{s} {spec.count(s) * len(SHAPES)}" for s in SPLITS)
    print(f"wrote {out}: {counts} images")
