"""Run with the code of commit c17b4d0: a tiny format-2 cache (blosc chunks, codec JSON without 'compressor')."""
import json, sys, numpy as np, torch, shutil, os
sys.path.insert(0, '/work/main')
from logitcache.cache.fidelity import write_cache, read_back, FORMAT_2
out = sys.argv[1]
shutil.rmtree(out, ignore_errors=True)
g = torch.Generator().manual_seed(3)
n, C, k = 12, 20, 3
z = torch.randn(n, C, generator=g) * 3
y = torch.randint(0, C, (n,), generator=g)
views = np.arange(n * 5, dtype=np.int16).reshape(n, 5) - 7
fields = ("crop_area", "crop_ratio", "crop_y", "crop_x", "flip")
lengths = write_cache(out, z, y, views, fields, k, (1.0, 4.0), FORMAT_2, None, shard_size=7)
tk, r = read_back(out, y, lengths)
exp = {"lengths": list(lengths), "target": y.tolist(), "codec": r.codec_name,
       "log_probs_T1": tk.log_probs(1.0).tolist(), "log_probs_T4": tk.log_probs(4.0).tolist(),
       "params": [r.read_unit(0, s).view_params.tolist() for s in range(len(lengths))]}
json.dump(exp, open(os.path.join(out, "..", "expected.json"), "w"))
print(r.codec_name, lengths)
