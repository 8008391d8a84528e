"""Run the benchmark suite; write a JSON summary (comparable between commits) and the README's performance table.

    .venv/bin/python pipelines/bench.py --all            # every benchmark (about 10 minutes on 2 CPU cores)
    .venv/bin/python pipelines/bench.py data storage     # some of them

Each benchmark is its own script with `--json` and prints ratios measured against a baseline in the same run.
The summary goes to `pipelines/results/bench-<date>-<commit>.json`; the Markdown table replaces the block
between the `<!-- bench:start -->` / `<!-- bench:end -->` markers in README.md (with date, commit and machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def rows_data(r):
    return [("data", "decode+augment, ImageNet recipe, 224 px, per core",
             f"{r['images_per_s_one_core']['ours (torchvision decode)']:.0f} img/s vs bare PIL loop "
             f"{r['images_per_s_one_core']['bare PIL loop']:.0f}", f"{r['ratio_ours_vs_bare_pil']:.2f}", "≥ 1.0"),
            ("data", "read+decode through webdataset's stages vs the v1 reading path, per core",
             f"{r['images_per_s_one_core']['read+decode: new (webdataset stages)']:.0f} vs "
             f"{r['images_per_s_one_core']['read+decode: v1 path']:.0f} img/s (webdataset tarfile_to_samples "
             f"{r['images_per_s_one_core']['read+decode: webdataset tarfile_to_samples']:.0f})",
             f"{r['ratio_read_decode_new_vs_v1']:.3f}", "≥ 0.95")]


def rows_convert(r):
    ips = r["images_per_s"]
    w = r["workers"]
    return [("convert", f"shards folder, {w} workers vs 1 ({r['images']} JPEGs, {r['megabytes']} MB)",
             f"{ips[f'folder, {w} workers']:.0f} vs {ips['folder, 1 worker']:.0f} img/s, same bytes: "
             f"{r['same_output_folder']}", f"{r['speedup_folder']:.2f}×", ""),
            ("convert", f"shards scan, {w} workers vs 1",
             f"{ips[f'scan, {w} workers']:.0f} vs {ips['scan, 1 worker']:.0f} img/s, same manifest: "
             f"{r['same_output_scan']}", f"{r['speedup_scan']:.2f}×", "")]


def rows_losses(r):
    worst = max(r["losses"], key=lambda x: x["fraction_of_step"])
    return [("losses", f"fwd+bwd at ({r['batch_size']}, {r['classes']}) vs one resnet18 step at "
             f"{r['image_size']} px (worst: {worst['name']})", f"{worst['ms']:.2f} ms",
             f"{100 * worst['fraction_of_step']:.2f}% of step", "≤ 5%")]


def rows_storage(r):
    out = []
    for row in r["rows"]:
        if row["teacher"] != "default" or row["k"] != 10:
            continue
        target = {"format 2": "≤ 24 B, KL/NKD ≤ format 1",
                  "format 2 prior": "NKD ≤ 2% at ≤ 32 B"}.get(row["setting"], "")
        expected = ""
        if "expected_relerr_nkd_T1" in row:  # a sampled tail: its mean gradient over draws (bench_storage.py)
            target = "NKD ≤ 2% at ≤ 32 B (expected)"
            expected = (f"expected NKD grad err {row['expected_relerr_nkd_T1']:.1e} over {row['draws']} draws "
                        f"(MC floor {row['mc_floor_nkd_T1']:.1e}); ")
        out.append(("storage", f"{row['setting']} ({row['codec']}, tail {row['tail']}), k=10, C=1000, "
                    f"{len(r['temperatures'])} temperature(s)",
                    f"KL(dense‖cache) {row['kl_T1']:.3f} nats; NKD grad err {row['grad_relerr_nkd_T1']:.1e}; "
                    f"{expected}"
                    f"{row['objects_per_unit']:.0f} objects/unit, du/logical {row['allocated_over_logical']:.2f}",
                    f"{row['bytes_per_view']:.1f} B", target))
    for name, t in r["teachers"].items():
        out.append(("storage", f"synthetic teacher '{name}' (see bench_storage.py)",
                    f"acc {t['accuracy']:.2f}, mean top-1 prob {t['mean_top1_prob']:.2f}, top-10 mass "
                    f"{t['mean_top10_mass']:.2f}", "", ""))
    return out


def rows_dump(r):
    return [("dump", f"{r['teacher']} at {r['image_size']} px, {r['views']} views: dump vs bare inference",
             f"{r['dump_views_per_s']:.1f} vs {r['bare_views_per_s']:.1f} views/s", f"{r['overhead_ratio']:.3f}",
             "≤ 1.05")]


def ratio_rows(section: str):
    """Rows of a benchmark whose JSON holds ``{name: {"what", "detail", "ratio", "target"}}`` entries."""

    def rows(r):
        return [(section, row.get("what", key), row.get("detail", ""), f"{row['ratio']:.3f}", row.get("target", ""))
                for key, row in r.items() if isinstance(row, dict) and "ratio" in row]

    return rows


def rows_reader(r):
    return [("reader", f"views/s reading {name} (k={r['setup']['k']}, C={r['setup']['classes']}), local vs S3 (moto)",
             f"{v['local']:,.0f} vs {v['s3']:,.0f} views/s", f"{v['local_over_s3']:.1f}× local/S3", "")
            for name, v in r["views_per_s"].items()]


BENCHMARKS = {
    "data": ("bench_data.py", [], rows_data),
    "convert": ("bench_convert.py", [], rows_convert),
    "losses": ("bench_losses.py", [], rows_losses),
    "storage": ("bench_storage.py", ["--temperatures", "1"], rows_storage),
    "dump": ("bench_dump.py", [], rows_dump),
    "train": ("bench_train.py", [], ratio_rows("train")),
    "reader": ("bench_reader.py", [], rows_reader),
}


def git_commit() -> str:
    res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return res.stdout.strip() or "unknown"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)}")
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--no-readme", action="store_true", help="do not rewrite README.md's performance table")
    args = ap.parse_args(argv)
    names = list(BENCHMARKS) if args.all else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        sys.exit(f"choose benchmarks from {list(BENCHMARKS)} or --all (unknown: {unknown})")
    commit, date = git_commit(), time.strftime("%Y-%m-%d")
    machine = {"machine": platform.machine(), "cpus": os.cpu_count(), "processor": platform.processor(),
               "python": platform.python_version()}
    summary = {"date": date, "commit": commit, "machine": machine, "results": {}}
    rows = []
    for name in names:
        script, extra, to_rows = BENCHMARKS[name]
        print(f"== {name}: {script} {' '.join(extra)}", flush=True)
        t0 = time.time()
        res = subprocess.run([sys.executable, str(HERE / script), *extra, "--json"], cwd=REPO, text=True,
                             stdout=subprocess.PIPE)
        if res.returncode != 0:
            print(f"   {name} FAILED (exit {res.returncode})", flush=True)
            summary["results"][name] = {"error": res.returncode}
            continue
        result = json.loads(res.stdout)
        result["wall_seconds"] = time.time() - t0
        summary["results"][name] = result
        rows += to_rows(result)
        print(f"   done in {result['wall_seconds']:.0f} s", flush=True)
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"bench-{date}-{commit}.json"
    out.write_text(json.dumps(summary, indent=1))
    table = [f"Last run: {date}, commit {commit}, {machine['cpus']} CPU(s) {machine['machine']}, no GPU "
             f"(`.venv/bin/python pipelines/bench.py --all`; JSON: `pipelines/results/{out.name}`).", "",
             "| benchmark | what | detail | figure | target |", "|---|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in rows]
    text = "\n".join(table)
    print("\n" + text)
    readme = REPO / "README.md"
    if not args.no_readme and readme.exists():
        s = readme.read_text()
        if START in s and END in s:
            head, rest = s.split(START, 1)
            _, tail = rest.split(END, 1)
            readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
            print(f"\nupdated the performance table in {readme}")
    print(f"summary: {out}")


if __name__ == "__main__":
    main()
