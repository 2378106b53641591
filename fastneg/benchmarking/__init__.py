"""The machinery the scripts in benchmarks/ share, so that each script imports it from the
installed package (`python benchmarks/X.py` needs no path edits):

- timing: calls timed on CPU and CUDA, in alternation with a yardstick, caches evicted;
  patch_negatives against a plain copy (patch_vs_copy);
- common: the scripts' flag types, the machine's description, CPU time and memory of a process
  tree, the environment of a measured row;
- data: the default dataset, the texture bank and FFCV .beton of a run, folders of many tiny
  files, finished training batches from a fastneg loader;
- published: the baseline, the data path users of the published code run (measurement only).

Benchmark code, not library code: it sits on top of the package (it may import any fastneg
module) and nothing else in fastneg imports it (tests/test_structure.py checks both).
Each script keeps its own logic; only what two or more scripts (or the tests) use lives here.
"""
