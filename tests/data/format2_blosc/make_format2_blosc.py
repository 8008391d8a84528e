"""Writes the format2_blosc fixture next to this file: a tiny format-2 cache as the code of commit c17b4d0 wrote
it (blosc chunks, a codec JSON without "compressor"), and expected.json, what that code read back from it.

Run once, from a checkout of c17b4d0:  PYTHONPATH=. python tests/data/format2_blosc/make_format2_blosc.py
(`test_codecs.py::test_a_format_2_cache_from_before_the_lzma_compressor_still_reads_and_verifies` reads it)."""

import json
import pathlib
import shutil

import numpy as np
import torch

from logitcache.cache.fidelity import FORMAT_2, read_back, write_cache

HERE = pathlib.Path(__file__).parent
out = HERE / "cache.zarr"
shutil.rmtree(out, ignore_errors=True)
g = torch.Generator().manual_seed(3)
n, C, k = 12, 20, 3
z = torch.randn(n, C, generator=g) * 3
y = torch.randint(0, C, (n,), generator=g)
views = np.arange(n * 5, dtype=np.int16).reshape(n, 5) - 7
fields = ("crop_area", "crop_ratio", "crop_y", "crop_x", "flip")
lengths = write_cache(str(out), z, y, views, fields, k, (1.0, 4.0), FORMAT_2, None, shard_size=7)
tk, r = read_back(str(out), y, lengths)
expected = {"lengths": list(lengths), "target": y.tolist(), "codec": r.codec_name,
            "log_probs_T1": tk.log_probs(1.0).tolist(), "log_probs_T4": tk.log_probs(4.0).tolist(),
            "params": [r.read_unit(0, s).view_params.tolist() for s in range(len(lengths))]}
(HERE / "expected.json").write_text(json.dumps(expected))
print(r.codec_name, lengths)
