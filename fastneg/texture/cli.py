"""`fastneg build-bank`: the texture bank of an ImageFolder (one quilted texture per image)."""
from __future__ import annotations

from fastneg.texture import synthesis
from fastneg.texture.build import BankSpec, build_bank, write_preview


def register(sub) -> None:
    m = sub.add_parser(
        "build-bank", help="synthesize one texture per image of an ImageFolder (texture negatives)",
        description="Build a texture bank: for every image (dataset index order), image quilting "
                    "from its central and one random EXEMPLAR-pixel crop makes a SIZE x SIZE "
                    "texture. Stored as JPEG files (BANK/textures.jpg + spans.i8; the loaders decode them "
                    "with the images) or with --format raw as BANK/textures.u8 (uint8 [rows, size, "
                    "size, 3]), + BANK/index.json. Interrupted builds continue with --resume.")
    m.add_argument("data", help="ImageFolder root (class sub-folders), e.g. data/shapes/train")
    m.add_argument("--out", required=True, help="bank folder")
    m.add_argument("--size", type=int, default=synthesis.PAPER_SIZE,
                   help=f"texture side in pixels (default {synthesis.PAPER_SIZE})")
    m.add_argument("--exemplar", type=int, default=synthesis.PAPER_EXEMPLAR,
                   help=f"exemplar crop side (default {synthesis.PAPER_EXEMPLAR}); smaller images "
                        "are first upscaled so their shorter side equals it")
    m.add_argument("--block", type=int, default=None,
                   help="quilting block side (default 3/8 of --exemplar: 36)")
    m.add_argument("--overlap", type=int, default=None,
                   help="block overlap (default 1/6 of --block: 6)")
    m.add_argument("--tol", type=float, default=0.1,
                   help="quilting tolerance: candidates within (1 + TOL) of the best overlap "
                        "error (default 0.1)")
    m.add_argument("--seed", type=int, default=0, help="synthesis seed (default 0)")
    m.add_argument("--limit", type=int, default=None,
                   help="make only this many textures, a class-stratified subset; each image then "
                        "uses a texture of its own class (see fastneg.texture.build)")
    m.add_argument("--format", choices=("jpeg", "raw"), default="jpeg",
                   help="storage: jpeg (default; read by the loaders like images, for any bank "
                        "size) or raw (uint8 array; small banks loaded whole on the device)")
    m.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    m.add_argument("--workers", type=int, default=None,
                   help="processes (default: available cores)")
    m.add_argument("--chunk", type=int, default=16,
                   help="textures per work item and per durable write (default 16)")
    m.add_argument("--resume", action="store_true", help="continue an interrupted build")
    m.add_argument("--force", action="store_true", help="replace an existing bank")
    m.add_argument("--preview", metavar="PNG", default=None,
                   help="also write a PNG grid of source images beside their textures")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=run)


def run(args) -> None:
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    spec = BankSpec(size=args.size, exemplar=args.exemplar, block=args.block,
                    overlap=args.overlap, tol=args.tol, seed=args.seed,
                    limit=args.limit, storage=args.format, quality=args.quality)
    report = build_bank(args.data, args.out, spec, workers=args.workers, resume=args.resume,
                        force=args.force, chunk=args.chunk, progress=not args.quiet)
    print(report.summary())
    if args.preview:
        print(f"wrote {write_preview(args.out, args.preview)}")
