import dataclasses

import pytest

from p2pkv.keys import NamespaceSpec, chunk_keys


def spec(**over) -> NamespaceSpec:
    base = dict(model="m", revision="", kv_dtype="torch.float32", device_type="cpu",
                block_size=128, chunk_blocks=1, num_layers=30, num_kv_heads=3, head_size=64,
                hash_algorithm="sha256")
    base.update(over)
    return NamespaceSpec(**base)


def test_chunk_keys_are_last_block_hash_of_each_full_chunk():
    hashes = [bytes([i]) * 32 for i in range(7)]
    assert chunk_keys(hashes, 1) == hashes
    assert chunk_keys(hashes, 3) == [hashes[2], hashes[5]]
    assert chunk_keys(hashes[:2], 3) == []


def test_fingerprint_is_stable_and_sensitive_to_every_field():
    a = spec()
    assert a.fingerprint() == spec().fingerprint()
    for f in dataclasses.fields(NamespaceSpec):
        value = getattr(a, f.name)
        changed = value + 1 if isinstance(value, int) else value + "x"
        changed_spec = spec(**{f.name: changed})
        assert changed_spec.fingerprint() != a.fingerprint(), f.name


def test_the_namespace_does_not_depend_on_parallelism():
    # instances at different TP/PP share chunks: each rank holds a slice (p2pkv/slices.py)
    names = {f.name for f in dataclasses.fields(NamespaceSpec)}
    assert not names & {"tp_size", "tp_rank", "pp_size", "pp_rank"}


def test_invalid_spec_is_refused():
    with pytest.raises(ValueError):
        spec(block_size=0)
    with pytest.raises(ValueError):
        spec(num_kv_heads=0)
    with pytest.raises(ValueError):
        chunk_keys([], 0)


def test_partial_chunk_key_names_the_tail_and_never_a_full_chunk():
    from p2pkv.keys import partial_chunk_key, prompt_keys

    hashes = [bytes([i]) * 32 for i in range(3)]
    tokens = list(range(3 * 4 + 2))
    key = partial_chunk_key(hashes, tokens, 4, 1)
    assert key is not None and key not in hashes
    assert partial_chunk_key(hashes, tokens + [99], 4, 1) != key  # longer tail
    assert partial_chunk_key(hashes, tokens[:-1] + [7], 4, 1) != key  # other tail token
    other_prefix = [hashes[0], bytes([9]) * 32, hashes[2]]  # chained: block 1 differs too
    assert partial_chunk_key(other_prefix, tokens, 4, 2) != partial_chunk_key(hashes, tokens, 4, 2)
    assert partial_chunk_key(hashes, tokens[:12], 4, 1) is None  # ends on a chunk boundary
    assert partial_chunk_key([], tokens[:3], 4, 1) is None  # shorter than a block
    assert prompt_keys(hashes, tokens, 4, 1, with_partial=True) == [*hashes, key]
    assert prompt_keys(hashes, tokens, 4, 1, with_partial=False) == hashes
