"""``deepalign convert GGUF``: de-quantise a GGUF file once into a safetensors folder.

Every deepalign command given a GGUF file does this by itself on first use (into the cache,
``$DEEPALIGN_CACHE/gguf/``, default ``~/.cache/deepalign/gguf/``) and loads the folder afterwards;
this command does it ahead of time, or into a folder of your choice (``--output``), and prints
the folder. A model loaded from the folder can be trained and saved, unlike one loaded from the
GGUF file directly.
"""

from __future__ import annotations

import argparse

from deepalign.cli.args import gguf_file, output_dir


def register(commands) -> None:
    convert = commands.add_parser(
        "convert", help="de-quantise a GGUF file once into a safetensors folder (prints the folder)",
        description=__doc__.split("\n\n", 1)[1])
    convert.add_argument("gguf", metavar="GGUF", type=gguf_file, help="the GGUF file (or a folder holding one)")
    convert.add_argument("--output", type=output_dir,
                         help="folder to write (new or empty; default: the cache folder keyed by the file's sha256, "
                              "which deepalign's loaders find by themselves)")
    convert.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deepalign.models.loading import convert_gguf, find_conversion

    folder = find_conversion(args.gguf) if args.output is None else None
    print(folder or convert_gguf(args.gguf, args.output, output_name="--output"))
    return 0
