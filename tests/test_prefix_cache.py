"""The tool-prefix cache: RAM LRU, disk entries, corruption, eviction, concurrent writers."""

from __future__ import annotations

import multiprocessing
import os

from toolgrad_edge.prefix_cache import PrefixCache, model_identity, prefix_key


def test_key_depends_on_model_tokens_and_settings(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 100)
    mid = model_identity(model)
    base = prefix_key(mid, [1, 2, 3], "ctx=8192")
    assert base == prefix_key(mid, [1, 2, 3], "ctx=8192")
    assert base != prefix_key(mid, [1, 2, 4], "ctx=8192")
    assert base != prefix_key(mid, [1, 2, 3], "ctx=4096")
    model.write_bytes(b"GGUF" + b"\1" * 100)
    assert model_identity(model) != mid


def test_ram_lru(tmp_path):
    cache = PrefixCache(None, ram_entries=2)
    cache.put("a", b"A")
    cache.put("b", b"B")
    assert cache.get("a") == b"A"  # a is now most recent
    cache.put("c", b"C")  # evicts b
    assert cache.get("b") is None
    assert cache.get("a") == b"A" and cache.get("c") == b"C"
    assert cache.stats.ram_hits == 3 and cache.stats.misses == 1


def test_disk_roundtrip_across_instances(tmp_path):
    PrefixCache(tmp_path).put("k1", b"state-bytes" * 100)
    fresh = PrefixCache(tmp_path)
    assert fresh.get("k1") == b"state-bytes" * 100
    assert fresh.stats.disk_hits == 1


def test_corrupt_entry_is_ignored_and_deleted(tmp_path):
    PrefixCache(tmp_path).put("k1", b"x" * 1000)
    path = tmp_path / "k1.state"
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    fresh = PrefixCache(tmp_path)
    assert fresh.get("k1") is None
    assert fresh.stats.rejected == 1
    assert not path.exists()


def test_foreign_entry_is_not_trusted(tmp_path):
    PrefixCache(tmp_path).put("k1", b"x" * 1000)
    os.replace(tmp_path / "k1.state", tmp_path / "k2.state")  # right format, wrong key
    assert PrefixCache(tmp_path).get("k2") is None
    (tmp_path / "junk.state").write_bytes(b"not an entry")
    assert PrefixCache(tmp_path).get("junk") is None


def test_disk_is_size_bounded(tmp_path):
    cache = PrefixCache(tmp_path, disk_limit_bytes=3500)
    for i in range(6):
        cache.put(f"k{i}", bytes([i]) * 1000)
        os.utime(tmp_path / f"k{i}.state", (i, i))  # deterministic ages
    files = sorted(p.name for p in tmp_path.glob("*.state"))
    total = sum(p.stat().st_size for p in tmp_path.glob("*.state"))
    assert total <= 3500
    assert "k5.state" in files and "k0.state" not in files


def _write_many(directory, payload, n):
    cache = PrefixCache(directory)
    for _ in range(n):
        cache.put("shared", payload)


def test_two_processes_writing_the_same_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(tmp_path, bytes([i]) * 200_000, 20)) for i in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    state = PrefixCache(tmp_path).get("shared")
    assert state in (bytes([1]) * 200_000, bytes([2]) * 200_000)
    assert not list(tmp_path.glob(".tmp-*"))
