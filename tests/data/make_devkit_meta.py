"""Writes the devkit-like meta.mat fixtures next to this file (run once, with scipy, in a throwaway venv):
4 leaf synsets in the devkit's own (not sorted) ILSVRC2012_ID order plus one parent synset, with the fields
and types of ILSVRC2012_devkit_t12/data/meta.mat; compressed (miCOMPRESSED) and plain variants."""

import numpy as np
import scipy.io

FIELDS = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
          "num_train_images"]
ROWS = [
    (1, "n02119789", "kit fox, Vulpes macrotis", "small grey fox", 0, np.zeros((1, 0)), 0, 1300),
    (2, "n01440764", "tench, Tinca tinca", "freshwater fish", 0, np.zeros((1, 0)), 0, 1300),
    (3, "n09999999", "zzz", "last sorted", 0, np.zeros((1, 0)), 0, 732),
    (4, "n01443537", "goldfish, Carassius auratus", "small golden fish", 0, np.zeros((1, 0)), 0, 1300),
    (1001, "n00001740", "entity", "root", 4, np.array([[1.0, 2.0, 3.0, 4.0]]), 18, 0),
]
arr = np.zeros((len(ROWS), 1), dtype=[(f, object) for f in FIELDS])
for i, row in enumerate(ROWS):
    for f, v in zip(FIELDS, row, strict=True):
        arr[i, 0][f] = np.array([[float(v)]]) if isinstance(v, int) else v
scipy.io.savemat("devkit_meta_compressed.mat", {"synsets": arr}, do_compression=True)
scipy.io.savemat("devkit_meta_plain.mat", {"synsets": arr}, do_compression=False)
