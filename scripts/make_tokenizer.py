"""Train the embedded default SentencePiece model from the bundled corpus.

    python scripts/make_tokenizer.py            # writes llama_ref/assets/tokenizer.model
    python scripts/make_tokenizer.py --check    # exit 1 if the shipped model differs from a fresh training

The settings follow Meta's Llama 2 tokenizer (BPE, byte fallback, digits split, identity normalisation, no
whitespace collapsing, unk/bos/eos = 0/1/2, no pad), scaled down to 512 pieces. Training is deterministic: one
thread, a fixed random seed, and the corpus fed through an iterator so that no file path is recorded in the
model's trainer spec. The output is byte-identical across runs with the same sentencepiece version; another
version may produce a different (equally valid) model, which `--check` reports.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import sentencepiece as spm

from llama_ref.formats.atomic import atomic_write

ASSETS = Path(__file__).resolve().parent.parent / "llama_ref" / "assets"
CORPUS = ASSETS / "corpus.txt"
OUTPUT = ASSETS / "tokenizer.model"
SEED = 0
# The version that trained the shipped model; tests compare a fresh training with it only under this version.
SENTENCEPIECE_VERSION = "0.2.3"

TRAINER_OPTIONS = dict(
    model_type="bpe",
    vocab_size=512,
    byte_fallback=True,  # any UTF-8 text encodes: unseen characters become <0xNN> pieces
    character_coverage=1.0,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    normalization_rule_name="identity",  # with the next line: decode(encode(s)) == s (see tokenizer.py)
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    input_sentence_size=0,  # use every line: no sampling
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=1,
)


def train(corpus: Path = CORPUS) -> bytes:
    """Return the serialized ModelProto trained on `corpus` (one sentence per non-empty line)."""
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    spm.set_random_generator_seed(SEED)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, **TRAINER_OPTIONS)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="training text (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="model file (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args(argv)

    model = train(args.corpus)
    if args.check:
        shipped = args.output.read_bytes() if args.output.exists() else None
        if shipped != model:
            print(f"{args.output} differs from a fresh training on {args.corpus} "
                  f"(sentencepiece {spm.__version__}); rerun without --check", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date ({len(model)} bytes)")
        return 0
    atomic_write(args.output, model)
    print(f"wrote {args.output} ({len(model)} bytes, sentencepiece {spm.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
