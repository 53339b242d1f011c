"""Stage `validate_params`: check the whole params.yaml before any other stage runs.

Every other stage depends on its output, so DVC runs it first: a typo or an out-of-range value
stops `dvc repro` here, with the key's dotted name, before DVC removes any stage's outputs. The
file it writes has the same content whenever the parameters are valid, so a valid change reruns
only the stages that read the changed keys.
"""

from __future__ import annotations

import argparse
import sys

from ctrldiff.io import atomic_path
from ctrldiff.params import ParamsError, load_params

PARAMS = "params.yaml"
VALID = "data/params.valid"


def main(argv: list[str] | None = None) -> None:
    args = argparse.ArgumentParser(description=__doc__).parse_args(argv)  # noqa: F841
    try:
        load_params(PARAMS)
    except ParamsError as err:
        sys.exit(f"validate_params: {err}\nNothing was run and no output was removed.")
    with atomic_path(VALID) as tmp:
        tmp.write_text(f"{PARAMS}: valid\n")
    print(f"validate_params: {PARAMS} is valid")


if __name__ == "__main__":
    main()
