"""One module per DVC stage, named after it (``dvc.yaml``): each has an ``Options`` (what the
``voltage`` command line gives it) and ``run(opts)``; ``training/cli.py`` only parses and prints."""
