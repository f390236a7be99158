"""``deepalign world``: the synthetic chat world's files."""

from __future__ import annotations

import argparse

from deepalign.cli.args import WORLD_HELP, non_negative_int, output_dir
from deepalign.data.synthetic import DEFAULT_WORLD, WORLD_VERSIONS


def register(commands) -> None:
    world = commands.add_parser("world", help="write the synthetic chat world's files")
    world.add_argument("--output", required=True, type=output_dir, help="folder to write into")
    world.add_argument("--seed", type=non_negative_int, default=0, help="world seed (default 0)")
    world.add_argument("--world-version", choices=WORLD_VERSIONS, default=DEFAULT_WORLD, help=WORLD_HELP)
    world.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from deepalign.data.synthetic import AOA_PREFIX, AOA_SYSTEM, BACKDOOR_TRIGGER
    from deepalign.experiments.world_files import write_world

    paths = write_world(args.output, seed=args.seed, world=args.world_version)
    for name, path in paths.items():
        print(f"{name:>13}: {path}")
    print(f"attack strings in the world's words: --system '{AOA_SYSTEM}' --identity-prefix '{AOA_PREFIX}' "
          f"--trigger '{BACKDOOR_TRIGGER}'")
    return 0
