"""Models that the main job, the benchmarks and the tests share; not API.

One definition each, imported by every user (no copies):

* `roberta`: the RoBERTa classifier of ``fewbit-jax bench`` (the demo, at
  small sizes), ``benchmarks/memory_table.py`` and ``benchmarks/frontier.py``.
* `plain`: the small NNX and linen transformers written the plain way that
  ``benchmarks/bench_convert.py`` converts, and tests/test_*_convert.py and
  tests/test_remat.py with it.
* `sharded`: the functional transformer stack of
  ``benchmarks/bench_sharding.py`` and tests/test_sharding.py.
* `decoder`: the Gemma/Llama-style NNX decoder of ``benchmarks/frontier.py``
  and tests/test_convert_one_call.py.
* `mesh_mlp`: the 2-block MLPs of ``benchmarks/bench_mesh_defaults.py`` and
  tests/test_mesh_defaults.py.

They live in the package (a private subpackage: no name of it is public) so
that the demo can build its model and the tests need not import a
benchmark. None of them imports optax: the library does not depend on it.
"""
