"""``python -m p2pkv.directory [--bind ...] [--ready-file F]``: the directory alone (tests,
benches); ``p2pkv directory`` is the same with the rest of the CLI around it."""

from p2pkv.directory.cli import directory_main

raise SystemExit(directory_main())
