"""`python -m fastneg.train` (also `torchrun ... -m fastneg.train`): see fastneg.train."""
from fastneg.train.loop import cli

cli("python -m fastneg.train")
