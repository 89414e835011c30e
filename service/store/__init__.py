"""The model store: the on-disk repository, what is loaded, metadata, runtimes."""
