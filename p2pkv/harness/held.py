"""Waiting until the directory shows an instance holding a prompt's chunks (tests, benches).

An instance saves a request's chunks on a save thread after the step that computed them
(``p2pkv.vllm.saver``) and publishes them from there, so its answer can come back before the
directory knows what it holds. A test that asks a second instance next, expecting a pull, must
first wait for that publish; otherwise the second instance's lookup finds nobody, computes
the prompt itself and gives the same answer without pulling (the CI flake of
``test_correctness_vllm.py::test_case[chunk-aligned]``). :class:`HeldWaiter` names the
prompt's chunks as an instance does (:class:`p2pkv.router.prompts.PromptKeyer`: vLLM's block
hasher, ``cache_salt`` folded in) and asks the directory with a real ``Lookup`` until the
instance holds all of them, within a deadline. Never a sleep.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pkv.directory.client import DirectoryClient
from p2pkv.secret import ClusterSecret
from p2pkv.directory.protocol import Lookup, LookupReply, Stats, StatsReply
from p2pkv.errors import P2PKVError
from p2pkv.keys import ChunkKey, Namespace

if TYPE_CHECKING:
    from p2pkv.router.prompts import PromptKeyer

CPU_BLOCK_TOKENS = 128
"""vLLM's block size on its CPU backend (the harness's instances), and the connector's
default chunk."""

POLL_S = 0.05
CALL_TIMEOUT_S = 2.0


class NotHeld(P2PKVError, TimeoutError):
    """The directory did not show the instance holding the chunks before the deadline."""


class HeldWaiter:
    """Asks the directory at ``directory`` which of a prompt's chunks an engine holds."""

    def __init__(self, directory: str, model: Path | str | None = None, *,
                 block_size: int = CPU_BLOCK_TOKENS, chunk_tokens: int = CPU_BLOCK_TOKENS,
                 secret: ClusterSecret | None = None) -> None:
        """``model``: the instances' model directory (its tokenizer and chat template name
        prompts' chunks); only :meth:`keys` and :meth:`chat_keys` need it. ``secret``: the
        cluster secret of a CURVE directory (lookups take the members' key)."""
        self._directory = directory
        self._secret = secret
        self._model = model
        self._block_size = block_size
        self._chunk_tokens = chunk_tokens
        self._keyer_made: PromptKeyer | None = None

    @property
    def _keyer(self) -> PromptKeyer:
        if self._keyer_made is None:
            from p2pkv.router.prompts import PromptKeyer

            if self._model is None:
                raise ValueError("naming a prompt's chunks needs the model")
            self._keyer_made = PromptKeyer(self._model, block_size=self._block_size,
                                           chunk_tokens=self._chunk_tokens)
        return self._keyer_made

    def keys(self, tokens: Sequence[int], cache_salt: str | None = None, *,
             partial: bool = False) -> tuple[ChunkKey, ...]:
        """The chunks an instance saves for ``tokens``: the full ones, and with ``partial``
        (a ``kv_producer``) the prompt's last, shorter one too."""
        keys = self._keyer.keys(list(tokens), cache_salt)
        return keys.keys if partial else keys.keys[:keys.full_chunks]

    def chat_keys(self, body: dict[str, Any], *, partial: bool = False
                  ) -> tuple[ChunkKey, ...]:
        """The chunks of a chat request's prompt (the chat template applied as vLLM does)."""
        tokens = self._keyer.chat_tokens(body)
        if tokens is None:
            raise ValueError("this chat request's prompt cannot be named")
        return self.keys(tokens, partial=partial)

    def held_run(self, engine: str, keys: Sequence[ChunkKey]) -> int:
        """How many of ``keys`` (leading run) the directory shows ``engine`` holding now;
        0 when the engine is not registered or the directory does not answer."""
        client = DirectoryClient(self._directory, secret=self._secret)
        try:
            return _held_run(client, engine, keys)
        finally:
            client.close()

    def wait_held(self, engine: str, keys: Sequence[ChunkKey], timeout_s: float = 30.0
                  ) -> float:
        """Return (the seconds waited) once the directory shows ``engine`` holding every one
        of ``keys``; raise :class:`NotHeld` at the deadline."""
        t0 = time.monotonic()
        client = DirectoryClient(self._directory, secret=self._secret)
        try:
            while (run := _held_run(client, engine, keys)) < len(keys):
                if time.monotonic() - t0 > timeout_s:
                    raise NotHeld(f"after {timeout_s:.0f} s the directory shows {engine} "
                                  f"holding {run} of the prompt's {len(keys)} chunks")
                time.sleep(POLL_S)
        finally:
            client.close()
        return time.monotonic() - t0


def _held_run(client: DirectoryClient, engine: str, keys: Sequence[ChunkKey]) -> int:
    """The run every registered rank of ``engine`` holds (the shortest of theirs: a puller
    at another tensor parallelism needs every holder rank's part)."""
    if not keys:
        return 0
    stats = client.call(Stats(), CALL_TIMEOUT_S)
    namespace = _namespace_of(stats, engine)
    if namespace is None:
        return 0
    assert isinstance(stats, StatsReply)
    ranks = {info.instance for info in stats.instances if engine in (info.engine, info.instance)}
    reply = client.call(Lookup(namespace=namespace, keys=list(keys)), CALL_TIMEOUT_S)
    if not isinstance(reply, LookupReply):
        return 0
    runs = {h.instance: h.run for h in reply.holders if h.instance in ranks}
    return min((runs.get(rank, 0) for rank in ranks), default=0)


def _namespace_of(reply: object, engine: str) -> Namespace | None:
    if not isinstance(reply, StatsReply):
        return None
    for info in reply.instances:
        if engine in (info.engine, info.instance):
            return info.namespace
    return None
