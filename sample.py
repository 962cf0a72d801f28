"""
Sample from a prior (prior.py): new images, and completions of real images' codes.

  python sample.py --ckpt out/prior_pqvae_mnist/ckpt.pt --num 64 [--temperature 1.0] [--top_k 0] [--seed 0]
  python sample.py --ckpt out/prior_pqvae_mnist/ckpt.pt --prefix 1,2,4,8,16,32 --split test [--num 8]

The first writes a grid of `num` decoded samples, 8 to a row (<ckpt stem>_samples.png). The second is PQ-VAE's
Table 3 for the split's first `num` images: a row of the images, a row of their reconstructions from all their codes,
then one row per l in --prefix, the first l codes from the tokenizer (the posterior) and the rest sampled from the
prior (<ckpt stem>_prefix.png). Any tokenizer's codes complete the same way, in their sequence order. The codes
behind each picture are saved beside it (.npy, one row per image).
"""

import argparse
import itertools
import os

import numpy as np
import torch
from tqdm import tqdm

import data
import eval as evaluation


def generate(model, prefix, args, generator):
    """Complete every row of prefix (B, m) to (B, n), in batches of args.batch_size, with a progress bar."""
    parts = [model.generate(prefix[i:i + args.batch_size], args.temperature, args.top_k, generator)
             for i in tqdm(range(0, len(prefix), args.batch_size), desc="sampling", leave=False)]
    return torch.cat(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description="Sample images from a prior trained by train.py --model prior.")
    p.add_argument("--ckpt", required=True, help="a prior's checkpoint")
    p.add_argument("--num", type=int, default=None, help="samples (default 64), or images with --prefix (default 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits; 0 takes the likeliest code")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest codes only; 0: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", default=None, help="comma-separated l's: complete the split's images from their "
                   "first l codes (PQ-VAE's Table 3)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the images for --prefix")
    p.add_argument("--data_dir", default=None, help="default: the one the prior was trained with")
    p.add_argument("--out", default=None, help="the PNG to write (default: next to the checkpoint)")
    p.add_argument("--batch_size", type=int, default=64, help="sequences sampled at once")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    num = args.num if args.num is not None else (8 if args.prefix else 64)
    if num < 1 or args.batch_size < 1 or args.top_k < 0 or not args.temperature >= 0:
        p.error("--num and --batch_size must be at least 1, --top_k and --temperature at least 0")
    if args.out and os.path.isdir(args.out):
        p.error(f"--out {args.out} is a folder; give the PNG's file name")

    device = evaluation.checked_device(args.device, "sample.py")
    model, ckpt = evaluation.load_model(args.ckpt, device, "sample.py")
    if not hasattr(model, "generate"):
        raise SystemExit(f"sample.py: {args.ckpt} holds a {ckpt['train_config']['model']} model, not a prior "
                         f"(train one with: python train.py --model prior --tokenizer {args.ckpt})")
    generator = torch.Generator(device).manual_seed(args.seed)
    stem = os.path.splitext(args.ckpt)[0]

    if args.prefix is None:
        codes = generate(model, torch.zeros(num, 0, dtype=torch.long, device=device), args, generator)
        images = torch.cat([model.decode(codes[i:i + args.batch_size]).cpu() for i in range(0, num, args.batch_size)])
        images = torch.cat([images, -torch.ones(-num % 8, *images.shape[1:])])  # black to fill the last row
        rows = [images[i:i + 8] for i in range(0, num, 8)]
        path = args.out or f"{stem}_samples.png"
    else:
        try:
            lengths = [int(v) for v in args.prefix.split(",") if v.strip()]
        except ValueError:
            p.error(f"--prefix expects comma-separated integers, got {args.prefix!r}")
        if not lengths or not all(0 <= n <= model.n for n in lengths):
            p.error(f"--prefix lengths must lie in 0..{model.n}, the codes per image, got {args.prefix!r}")
        tcfg = ckpt["train_config"]
        try:
            dataset = data.get_dataset(tcfg["dataset"], args.split, args.data_dir or tcfg["data_dir"] or None,
                                       ckpt["model_config"]["image_size"], ckpt["model_config"].get("in_channels"),
                                       skip_unreadable=True)  # an unreadable image is named and passed over
        except data.DataError as err:
            raise SystemExit(f"sample.py: {err}") from err
        readable = (image for image in map(dataset.__getitem__, range(len(dataset))) if image is not None)
        x = list(itertools.islice(readable, num))
        if not x:
            raise SystemExit(f"sample.py: not one readable image in the {args.split} split")
        x = torch.stack(x).to(device)
        posterior = model.encode(x)  # (num, n)
        completed = [generate(model, posterior[:, :n], args, generator) for n in lengths]
        codes = torch.cat([posterior, *completed])
        rows = [x.cpu(), model.decode(posterior).cpu(), *[model.decode(c).cpu() for c in completed]]
        path = args.out or f"{stem}_prefix.png"

    evaluation.save_rows(rows, path, n=max(len(r) for r in rows))
    np.save(os.path.splitext(path)[0] + ".npy", codes.cpu().numpy())
    what = "samples" if args.prefix is None else f"images, reconstructions, then completions from {args.prefix} codes"
    print(f"wrote {path} ({what}) and the codes in {os.path.splitext(path)[0]}.npy")
    return codes


if __name__ == "__main__":
    main()
