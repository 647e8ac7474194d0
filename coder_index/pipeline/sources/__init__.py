"""Inputs, each behind one small interface (``base``): a source lists its units in a stable order;
a unit, read where the work happens, yields images with one stable row name, final errors, read
failures (retried by the next run) and ``UnitDone`` marks. The runner, both engines, eval, corpus
build, explain and serve take any source and never ask which kind it is.

* ``folder``: a folder of image files, walked in a stable order;
* ``file_list``: files and URLs named one by one (arguments, ``--files-from``);
* ``shards``: webdataset tar shards, local or remote, compressed or not, and ``pipe:`` commands,
  grouped into samples by ``tar_samples`` (one stage for every way a shard is read);
* ``parquet``: parquet files (Hugging Face datasets, img2dataset), by row group;
* ``resolve``: the one place what the user typed becomes a source (brace patterns expanded as
  webdataset expands them); ``lookup``: one image of a container by its row, for explain and serve.

Adding a source is one module (units with ``read`` and ``split``, a source with ``units`` and
``record``), a line in ``resolve`` and its tests.
"""
