"""Check ``params.yaml`` as a whole before any work: every profile, and every method section
for every profile (with its overrides), parsed strictly.

    python -m pipelines.check                 # params.yaml
    python -m pipelines.check --params other.yaml

Each stage checks the sections it reads when it starts; this command checks them all at
once (it imports every method's module, which no stage does), so a typo in a method that
runs late fails in seconds. ``scripts/run.sh`` runs it before ``dvc repro``. Exits 2 with
one line naming the file and key on an error.
"""

from __future__ import annotations

import logging

from pipelines.common import base_parser, run_main
from pipelines.registry import validate_methods
from wmdd.config import load_params


def main(argv: list[str] | None = None) -> None:
    args = base_parser(__doc__ or "", dataset=False).parse_args(argv)
    params = load_params(args.params)
    validate_methods(params)
    logging.getLogger("pipelines.check").info(
        "%s: %d profiles and %d methods parse",
        args.params,
        len(params.datasets),
        len(params.methods),
    )


if __name__ == "__main__":
    run_main(main)
