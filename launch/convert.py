"""Convert checkpoints between our orbax format and Hugging Face safetensors.

  python -m launch.convert orbax-to-hf --checkpoint=runs/tiny --out=hf/tiny [--dtype=bf16|fp32]
  python -m launch.convert hf-to-orbax --hf_dir=DeepSeek-V3 --out=ckpt/v3 [--dtype=fp32|bf16]
      [--mtp=none|init]

orbax-to-hf reads a trainer workdir (its latest step), its checkpoints directory or one step
directory, and writes a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.
hf-to-orbax reads a Hugging Face or official DeepSeek-V3 directory (bf16, or FP8 with block
scales) and writes an orbax checkpoint for `launch.train --config.init_from=DIR`. Both stream
tensor by tensor; see dsv3_jax/convert/stream.py.
"""

from __future__ import annotations

import argparse
import sys

from dsv3_jax.convert import stream as convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("orbax-to-hf", help="orbax checkpoint -> Hugging Face directory")
    to_hf.add_argument("--checkpoint", required=True,
                       help="trainer workdir (latest step), its checkpoints dir, or a step dir")
    to_hf.add_argument("--out", required=True, help="new Hugging Face directory")
    to_hf.add_argument("--dtype", default="bf16", choices=sorted(convert.DTYPE_ALIASES),
                       help="tensor dtype (e_score_correction_bias stays float32)")
    to_hf.add_argument("--tokenizer", default=None,
                       help="tokenizer.json to export (default: the run's; 'none' for none)")
    to_hf.add_argument("--max_read_size", default=None,
                       help="largest block of a stacked leaf read at once (default: 2 x the "
                            "largest tensor in float32)")
    to_orbax = sub.add_parser("hf-to-orbax", help="Hugging Face directory -> orbax checkpoint")
    to_orbax.add_argument("--hf_dir", required=True, help="Hugging Face / DeepSeek-V3 directory")
    to_orbax.add_argument("--out", required=True, help="new orbax checkpoint directory")
    to_orbax.add_argument("--dtype", default="fp32", choices=sorted(convert.DTYPE_ALIASES),
                          help="stored params dtype (restored as float32; the bias is float32)")
    to_orbax.add_argument("--mtp", default="none", choices=convert.MTP_CHOICES,
                          help="when config.json asks for MTP but the files hold none (as "
                               "transformers' save_pretrained writes them): 'none' imports the "
                               "main model with MTP depth 0, 'init' adds a fresh MTP module "
                               "initialized as training does")
    to_orbax.add_argument("--seed", type=int, default=0,
                          help="the random seed of --mtp=init (as training's --config.seed)")
    to_hf.add_argument("--max_shard_size", default="5GB",
                       help="safetensors shard size (e.g. 5GB, 500MB)")
    to_orbax.add_argument("--max_shard_size", default="1GiB",
                          help="bytes per orbax (OCDBT) commit; peak memory grows by about 5x "
                               "this")
    for p in (to_hf, to_orbax):
        p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        shard = convert.parse_size(args.max_shard_size)
        if args.command == "orbax-to-hf":
            read = convert.parse_size(args.max_read_size) if args.max_read_size else None
            out = convert.orbax_to_hf(args.checkpoint, args.out, args.dtype, shard,
                                      args.tokenizer, read, progress=not args.no_progress)
        else:
            out = convert.hf_to_orbax(args.hf_dir, args.out, args.dtype, shard,
                                      progress=not args.no_progress, mtp=args.mtp,
                                      seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
