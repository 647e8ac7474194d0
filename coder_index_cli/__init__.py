"""The `coder-index` command line (installed as the package ``coder_index_cli``)."""
