"""The ``bdrun`` command line."""
