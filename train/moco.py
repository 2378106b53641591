"""Train MoCo-v2 with non-semantic negatives: the script entry of fastneg.train (see its
docstring, or --help), kept for `python train/moco.py ...` and `torchrun ... train/moco.py ...`.
`python -m fastneg.train` is the same trainer."""
import fastneg.train  # noqa: F401  (first: its process settings come before torch's import)
from fastneg.train.loop import cli, main  # noqa: F401  (main: for callers that load this file)

if __name__ == "__main__":
    cli("train/moco.py")
