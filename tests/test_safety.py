"""Opening a cache never executes code; metadata never makes logitcache write outside the store; checkpoints
that need pickle are refused.

Each hostile input comes with a control showing it is hostile (plain zarr, or torch without weights_only,
would run its payload); the payload only creates a file named PWNED, whose absence the tests check.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
from dataclasses import dataclass

import pytest
import torch
from _fake_cache import write_fake_cache
from click.testing import CliRunner

from logitcache.cache import schema
from logitcache.cache.reader import CacheReader
from logitcache.cache.store import ObjectStore
from logitcache.cache.verify import verify_cache
from logitcache.cache.writer import CacheWriter
from logitcache.cli import main
from logitcache.errors import CacheError, UnsafeCheckpointError

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "logitcache"
GROUP = "resnet34"  # the fake cache's group


# ------------------------------------------------------------------ static scan of the package
#: (module, attribute) calls that deserialise code-carrying formats
FORBIDDEN_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"), ("cPickle", "loads"),
    ("cloudpickle", "load"), ("cloudpickle", "loads"), ("dill", "load"), ("dill", "loads"),
    ("joblib", "load"), ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"),
    ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("jit", "load"), ("package", "PackageImporter"),
}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls in ``source`` that could execute code from data: pickle-family loads, eval/exec, np.load with
    allow_pickle=True, and torch.load without ``weights_only=True``."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else (
            f.value.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute) else None)
        kw = {k.arg: k.value for k in node.keywords}
        where = f"{filename}:{node.lineno}"
        if (owner, name) in FORBIDDEN_CALLS or (isinstance(f, ast.Name) and name in ("eval", "exec")):
            out.append(f"{where}: {owner + '.' if owner else ''}{name}(...)")
        elif name == "load" and owner == "torch":
            w = kw.get("weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                out.append(f"{where}: torch.load without weights_only=True")
        elif name == "load" and owner in ("np", "numpy"):
            a = kw.get("allow_pickle")
            if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                out.append(f"{where}: np.load with allow_pickle")
    return out


def test_scanner_catches_what_it_looks_for():
    src = ("import pickle, torch, numpy as np\npickle.loads(b'')\ntorch.load('x')\n"
           "torch.load('x', weights_only=False)\n"
           "np.load('x', allow_pickle=True)\neval('1')\ntorch.jit.load('m.pt')\n"
           "torch.load('x', weights_only=True)\nnp.load('x')\nmodel.eval()\n")
    found = unsafe_calls(src)
    assert [f.split(":")[1] for f in found] == ["2", "3", "4", "5", "6", "7"], found


def test_package_has_no_code_executing_loads():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        problems += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert problems == []
    # the one reader of torch files is models.weights.load_checkpoint (docstrings mention torch.load(...) elsewhere)
    code_loads = [
        p for p in sorted(PACKAGE.rglob("*.py"))
        for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "load"
        and isinstance(n.func.value, ast.Name) and n.func.value.id == "torch"
    ]
    assert {str(p.relative_to(PACKAGE)) for p in code_loads} == {"models/weights.py"}


# ------------------------------------------------------------------ hostile cache stores
@pytest.fixture
def cache(tmp_path):
    url, _ = write_fake_cache(str(tmp_path / "cache.zarr"))
    return url


@pytest.fixture
def pwned(tmp_path):
    return tmp_path / "PWNED"


def _register_exec_codec(pwned_path: pathlib.Path) -> str:
    """A zarr codec whose decode runs code (creates PWNED): a stand-in for any third-party codec installed
    in the environment, which a store can name in its metadata."""
    from zarr.abc.codec import BytesBytesCodec
    from zarr.registry import register_codec

    name = "logitcache-test.exec"

    @dataclass(frozen=True)
    class ExecOnDecode(BytesBytesCodec):
        is_fixed_size = True

        @classmethod
        def from_dict(cls, data):
            return cls()

        def to_dict(self):
            return {"name": name}

        async def _decode_single(self, chunk_bytes, chunk_spec):
            pathlib.Path(os.environ["LOGITCACHE_TEST_PWNED"]).touch()
            return chunk_bytes

        async def _encode_single(self, chunk_bytes, chunk_spec):
            return chunk_bytes

        def compute_encoded_size(self, input_byte_length, chunk_spec):
            return input_byte_length

    register_codec(name, ExecOnDecode)
    return name


def _add_codec(array_dir: pathlib.Path, codec: str) -> dict:
    meta = json.loads((array_dir / "zarr.json").read_text())
    meta["codecs"].insert(1, {"name": codec})
    (array_dir / "zarr.json").write_text(json.dumps(meta))
    return meta


def test_array_naming_a_foreign_codec_is_refused_before_decoding(cache, pwned, monkeypatch):
    import zarr

    monkeypatch.setenv("LOGITCACHE_TEST_PWNED", str(pwned))
    codec = _register_exec_codec(pwned)
    _add_codec(pathlib.Path(cache) / GROUP / schema.TOPK_INDICES, codec)

    control = zarr.open_array(os.path.join(cache, GROUP, schema.TOPK_INDICES), mode="r")
    try:
        control[0, 0]  # plain zarr decodes through the named codec (and fails after it ran)
    except Exception:
        pass
    assert pwned.exists(), "control: the crafted store should run its codec under plain zarr"
    pwned.unlink()

    with pytest.raises(CacheError, match=rf"refusing array {GROUP}/topk_indices: codecs .*{codec}"):
        CacheReader(cache).read_unit(0, 0)
    with pytest.raises(CacheError, match="refusing array"):
        verify_cache(cache)
    r = CliRunner().invoke(main, ["info", cache])
    assert r.exit_code == 1 and "refusing array" in r.output
    assert not pwned.exists()


def test_consolidated_metadata_cannot_swap_in_other_codecs(cache, pwned, monkeypatch):
    """The root zarr.json may carry consolidated metadata that zarr prefers over the arrays' own zarr.json;
    the reader ignores it, so the checked metadata is the metadata used."""
    import zarr

    monkeypatch.setenv("LOGITCACHE_TEST_PWNED", str(pwned))
    codec = _register_exec_codec(pwned)
    root = pathlib.Path(cache)
    arrays = {}
    for spec in schema.ARRAYS:
        meta = json.loads((root / GROUP / spec.name / "zarr.json").read_text())
        meta["codecs"].insert(1, {"name": codec})
        arrays[f"{GROUP}/{spec.name}"] = meta
    group_meta = json.loads((root / GROUP / "zarr.json").read_text())
    root_meta = json.loads((root / "zarr.json").read_text())
    root_meta["consolidated_metadata"] = {
        "kind": "inline", "must_understand": False, "metadata": {GROUP: group_meta, **arrays},
    }
    (root / "zarr.json").write_text(json.dumps(root_meta))

    try:
        zarr.open_group(cache, mode="r")[GROUP][schema.TOPK_INDICES][0, 0]
    except Exception:
        pass
    assert pwned.exists(), "control: plain zarr should decode through the consolidated (hostile) metadata"
    pwned.unlink()

    rows = CacheReader(cache).read_unit(0, 0)  # the arrays' own, checked metadata: reads fine
    assert rows.topk_indices.shape == (6, 5)
    assert verify_cache(cache).ok
    assert not pwned.exists()


def test_zarr_v2_store_is_refused(cache, tmp_path):
    """zarr v2 metadata can name numcodecs' pickle codec; a cache is zarr v3 and nothing else is opened."""
    v2 = tmp_path / "v2.zarr"
    v2.mkdir()
    attrs = json.loads((pathlib.Path(cache) / "zarr.json").read_text())["attributes"]
    (v2 / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (v2 / ".zattrs").write_text(json.dumps(attrs))
    (v2 / GROUP).mkdir()
    (v2 / GROUP / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (v2 / GROUP / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))  # looks listed
    (v2 / GROUP / schema.TOPK_INDICES).mkdir()
    (v2 / GROUP / schema.TOPK_INDICES / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [2, 2, 6, 5], "chunks": [1, 1, 6, 5], "dtype": "|O", "order": "C",
        "fill_value": None, "compressor": None, "filters": [{"id": "pickle", "protocol": 5}],
    }))
    with pytest.raises(CacheError, match="no cache at|not a"):
        CacheReader(str(v2)).read_unit(0, 0)
    with pytest.raises(CacheError):
        CacheReader(str(v2), GROUP).read_unit(0, 0)


def test_array_metadata_must_match_the_schema(cache):
    path = pathlib.Path(cache) / GROUP / schema.LSE / "zarr.json"
    meta = json.loads(path.read_text())
    meta["data_type"] = "float64"
    path.write_text(json.dumps(meta))
    with pytest.raises(CacheError, match=r"refusing array resnet34/lse: data_type 'float64' != 'float32'"):
        CacheReader(cache).meta  # noqa: B018


# ------------------------------------------------------------------ paths in metadata
@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "/abs", ".hidden", "", "zarr.json", "x" * 200, "a\\b"])
def test_unsafe_group_names_are_refused(name):
    with pytest.raises(ValueError, match="unsafe teacher group name"):
        schema.validate_group_name(name)


@pytest.mark.parametrize("name", ["resnet50", "timm_convnext_tiny.fb_in1k", "smallcnn_wide", "r50-seed1"])
def test_ordinary_group_names_are_accepted(name):
    assert schema.validate_group_name(name) == name


def _tree(path: pathlib.Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_group_name_cannot_write_outside_the_store(cache, tmp_path):
    from _fake_cache import _metas

    before = _tree(tmp_path)
    root, meta = _metas()
    for attempt in (
        lambda: CacheWriter.create_or_open(cache, "../evil", meta, root, {}),
        lambda: CacheWriter.create_or_open(str(tmp_path / "new.zarr"), "../evil", meta, root, {}),
        lambda: CacheWriter.open(cache, "../../evil"),
        lambda: CacheReader(cache, "../evil").meta,
        lambda: ObjectStore(cache).put("../evil.json", b"{}"),
        lambda: ObjectStore(cache).put(f"{GROUP}/../../evil.json", b"{}"),
        lambda: ObjectStore(cache).delete("../PWNED"),
    ):
        with pytest.raises(CacheError, match="unsafe"):
            attempt()
    assert _tree(tmp_path) == before


def test_dump_with_a_hostile_group_name_writes_nothing(small_shards, tmp_path):
    before = _tree(tmp_path)
    r = CliRunner().invoke(main, ["dump", "--data", str(small_shards), "--out", str(tmp_path / "c" / "cache.zarr"),
                                  "--teacher", "smallcnn", "--group", "../../evil", "--recipe", "small",
                                  "--image-size", "28", "--topk", "3"])
    assert r.exit_code != 0
    assert "unsafe teacher group name '../../evil'" in r.output and "Traceback" not in r.output
    assert _tree(tmp_path) == before


def test_marker_moved_onto_another_unit_is_refused(cache):
    """A marker certifies its own unit's chunks; copied onto another unit's key it must not certify those."""
    objects = ObjectStore(cache)
    objects.put(schema.unit_marker_key(GROUP, 1, 1), objects.get(schema.unit_marker_key(GROUP, 0, 0)))
    with pytest.raises(CacheError, match=r"units/e00001-s000001\.json says it is unit \(epoch 0, shard 0\)"):
        CacheReader(cache).markers()
    r = CliRunner().invoke(main, ["verify", cache])
    assert r.exit_code == 1 and "says it is unit" in r.output


# ------------------------------------------------------------------ checkpoints that need pickle
class _Payload:
    """Pickles to "call exec(...)" on load: what a hostile checkpoint looks like."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').close()",)


@pytest.fixture
def hostile_checkpoint(tmp_path, pwned):
    from logitcache.models.zoo import build_model

    state = build_model("smallcnn", 10, image_size=28).state_dict()
    path = tmp_path / "teacher.pt"
    torch.save({"model": state, "extra": _Payload(pwned)}, path)
    torch.load(path, weights_only=False)  # control: without weights_only the payload runs
    assert pwned.exists()
    pwned.unlink()
    return path


def test_load_checkpoint_refuses_pickle(hostile_checkpoint, pwned):
    from logitcache.models.weights import load_checkpoint

    with pytest.raises(UnsafeCheckpointError, match="needs pickle"):
        load_checkpoint(hostile_checkpoint)
    assert not pwned.exists()


def test_cli_refuses_a_teacher_checkpoint_that_needs_pickle(hostile_checkpoint, pwned, small_shards, tmp_path):
    out = tmp_path / "cache.zarr"
    r = CliRunner().invoke(main, ["dump", "--data", str(small_shards), "--out", str(out), "--teacher", "smallcnn",
                                  "--weights", str(hostile_checkpoint), "--recipe", "small", "--image-size", "28",
                                  "--topk", "3"])
    assert r.exit_code == 1
    assert "UnsafeCheckpointError" in r.output and "refusing this checkpoint" in r.output
    assert str(hostile_checkpoint) in r.output and "Traceback" not in r.output
    assert not pwned.exists() and not out.exists()

    r = CliRunner().invoke(main, ["eval", "--model", "smallcnn", "--checkpoint", str(hostile_checkpoint),
                                  "--data", str(small_shards), "--recipe", "small", "--image-size", "28"])
    assert r.exit_code == 1 and "UnsafeCheckpointError" in r.output
    assert not pwned.exists()


def test_cache_metadata_is_plain_json(cache):
    """Every metadata object in a cache parses as JSON; chunk objects are the only binary objects."""
    for p in pathlib.Path(cache).rglob("*"):
        if p.is_file() and "/c/" not in p.as_posix():
            json.loads(p.read_text(encoding="utf-8"))
