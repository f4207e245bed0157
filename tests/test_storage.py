"""Object storage by URI: the same behaviour on a local folder and on a real S3 server."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from vlm_ray.ledger import ShardLedger
from vlm_ray.storage import LocalStore, S3Store, Store, open_store


def test_write_then_read_round_trips(store: Store) -> None:
    store.write_bytes("a/b/c.bin", b"\x00\x01payload")
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01payload"
    store.write_json("m.json", {"x": 1})
    assert store.read_json("m.json") == {"x": 1}


def test_overwrite_replaces_the_whole_object(store: Store) -> None:
    store.write_text("k.txt", "a much longer first version")
    store.write_text("k.txt", "short")
    assert store.read_text("k.txt") == "short"


def test_missing_key_raises_file_not_found_naming_the_uri(store: Store) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope/missing\.json"):
        store.read_bytes("nope/missing.json")
    assert not store.exists("nope/missing.json")


def test_listing_is_recursive_sorted_and_relative_to_the_root(store: Store) -> None:
    for key in ("p/2.txt", "p/1.txt", "p/sub/3.txt", "q/4.txt"):
        store.write_text(key, key)
    assert sorted(store.list("p")) == ["p/1.txt", "p/2.txt", "p/sub/3.txt"]
    assert list(store.list("absent")) == []
    assert store.delete_prefix("p") == 3
    assert list(store.list("p")) == []


def test_folders_are_listed_one_level_deep_without_their_contents(store: Store) -> None:
    for key in ("bulk/b-job/input/all/shard-00000.parquet", "bulk/a-job/x.json", "bulk/top.json"):
        store.write_text(key, key)
    assert store.list_folders("bulk") == ["a-job", "b-job"]
    assert store.list_folders("bulk/b-job") == ["input"]
    assert store.list_folders("bulk/a-job") == []
    assert store.list_folders("absent") == []
    assert "bulk" in store.list_folders()


def test_create_exclusive_lets_exactly_one_of_many_racers_win(store: Store) -> None:
    wins: list[bool] = []
    lock = threading.Lock()

    def race(i: int) -> None:
        won = store.create_exclusive("done/shard-0.json", f"{i}".encode())
        with lock:
            wins.append(won)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    assert store.read_text("done/shard-0.json") in {str(i) for i in range(8)}


def test_child_store_sees_keys_under_its_prefix(store: Store) -> None:
    store.write_text("run1/x.txt", "x")
    child = store.child("run1")
    assert child.read_text("x.txt") == "x"
    assert child.uri == store.uri_of("run1")


def test_upload_and_download_dir_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "nested" / "b.bin").write_bytes(b"b")
    assert store.upload_dir(src, "model/adapter") == 2
    out = store.download_dir("model/adapter", tmp_path / "dst")
    assert (out / "a.txt").read_text() == "a" and (out / "nested" / "b.bin").read_bytes() == b"b"


def test_local_write_is_atomic_readers_never_see_a_partial_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.write_bytes("big.bin", b"1" * 1_000_000)
    stop = threading.Event()
    seen: set[int] = set()

    def reader() -> None:
        while not stop.is_set():
            seen.add(len(store.read_bytes("big.bin")))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(20):
        store.write_bytes("big.bin", (b"2" if i % 2 else b"3") * 1_000_000)
    stop.set()
    t.join()
    assert seen == {1_000_000}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="escapes"):
        LocalStore(tmp_path / "root").read_bytes("../../etc/passwd")


def test_uris_choose_the_backend(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/some/prefix", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store) and s3.uri == "s3://bucket/some/prefix"


def test_s3_endpoint_comes_from_the_environment_when_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    assert S3Store("s3://b/p").endpoint_url == "http://127.0.0.1:9"


def test_ledger_commits_each_shard_once_and_lists_records(store: Store) -> None:
    ledger = ShardLedger(store, "predictions/base")
    assert not ledger.is_done("shard-00000")
    assert ledger.commit("shard-00000", {"rows": 3}) is True
    assert ledger.commit("shard-00000", {"rows": 99}) is False
    ledger.commit("shard-00001", {"rows": 2})
    assert ledger.done_ids() == {"shard-00000", "shard-00001"}
    assert [r["rows"] for r in ledger.records()] == [3, 2]
    assert ledger.reset() == 2 and ledger.done_ids() == set()
