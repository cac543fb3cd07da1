"""The vLLM plugin entry point (``vllm.general_plugins`` → ``p2pkv.vllm.plugin:register``).

The short connector form (``"kv_connector":"P2PKVConnector"`` without a module path) on a real
vLLM run is covered by tests/test_prometheus_vllm.py, whose instances use it.
"""

from __future__ import annotations

import os
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from p2pkv.vllm import plugin

REPO = Path(__file__).resolve().parent.parent
GROUP = "vllm.general_plugins"


def declared() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["entry-points"][GROUP]


def test_pyproject_declares_the_plugin():
    assert declared() == {"p2pkv": "p2pkv.vllm.plugin:register"}


def test_installed_metadata_has_the_plugin():
    """What vLLM reads (importlib.metadata) must match pyproject.toml: an editable install made
    before the entry point was added has none, and vLLM would not find the connector."""
    installed = {e.name: e.value for e in entry_points(group=GROUP) if e.name == "p2pkv"}
    assert installed == declared(), (
        "the installed p2pkv metadata lacks or differs from pyproject.toml's vLLM plugin entry "
        "point: refresh the install (./scripts/setup.sh, or pip install --no-deps -e .)")


def test_register_makes_the_short_form_resolve():
    if os.environ.get("P2PKV_REQUIRE_E2E") != "1":
        pytest.importorskip("vllm", reason="vLLM is not installed (run scripts/setup.sh)")
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from p2pkv.vllm.connector import P2PKVConnector

    plugin.register()
    plugin.register()  # vLLM may load plugins more than once in a process
    short = KVTransferConfig(kv_connector="P2PKVConnector", kv_role="kv_both")
    long = KVTransferConfig(kv_connector="P2PKVConnector", kv_role="kv_both",
                            kv_connector_module_path="p2pkv.vllm.connector")
    assert KVConnectorFactory.get_connector_class(short) is P2PKVConnector
    assert KVConnectorFactory.get_connector_class(long) is P2PKVConnector


def test_the_entry_point_loads_the_register_function():
    (ep,) = [e for e in entry_points(group=GROUP) if e.name == "p2pkv"]
    assert ep.load() is plugin.register
