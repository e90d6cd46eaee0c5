"""Data-engine benchmarks, measured in one run.

    python bench/curate.py [--rows 100000 1000000] [--images 20000] [--tag-rows 100000]

Writes a Quilt-1M-style export of synthetic caption rows (every caption and every image file its own; the pixels
drawn from a pool of `--images` rendered tiles), then prints for each size,
each measured in a fresh process so that its peak resident memory is its own:
(1) import + dedup rows per second and peak memory, with images copied into the store and hard-linked into it,
    on the engine `--engine` picks (auto: a process pool on 2+ cores), and at the first size also in one process
    (the goals: >= 20k rows/s on 2 cores, memory flat in the row count);
(2) subfield tagging rows per second (features embedder, in process and on Ray Data);
(3) the dedup against datasketch's own path (MinHash.update_batch per row, MinHashLSH.insert) on the same rows:
    signatures and bucketing, ours / datasketch;
(4) teacher requests per second through our client against the local scripted teacher (fixtures/teacher.py) at
    concurrency 1, 8 and 32, with replies that take no time and with replies that take 50 ms (as a model server
    would), each as a ratio to concurrency 1;
(5) filter throughput on `--filter-rows` teacher outputs (default 1M), every rule on, one process (the goal:
    >= 20k rows/s on one core).

    python bench/curate.py --only teacher filter      # just (4) and (5)
    python bench/curate.py --only import --rows 100000  # the import alone, and what its image check costs an image
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_export(out: Path, n: int, n_images: int) -> Path:
    """The export, written unless `out` already holds one of `n` rows (a rerun over the same --workdir)."""
    from patho_r1.fixtures.raw import SUBFIELDS, caption, render
    from patho_r1.fixtures.synth import png_bytes
    from patho_r1.progress import count_lines

    done = out / "quilt_1M_lookup.csv"
    if done.is_file() and count_lines(done) == n + 1 and (out / "images" / f"{(n - 1) // 10000:03d}").is_dir():
        return done

    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = [png_bytes(render(SUBFIELDS[i % 6], i % 6, i % 3, rng, 32)) for i in range(n_images)]
    with (out / "quilt_1M_lookup.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Unnamed: 0", "caption", "image_path", "subset", "split"])
        for i in range(n):
            # A distinct file per row: a pool tile plus 8 bytes after its IEND chunk (PNG readers ignore them),
            # so every row has its own sha256, as in a real corpus, without rendering a million tiles.
            name = f"{i // 10000:03d}/r{i}.png"
            if i % 10000 == 0:
                (out / "images" / name).parent.mkdir(exist_ok=True)
            (out / "images" / name).write_bytes(pool[i % n_images] + i.to_bytes(8, "little"))
            w.writerow([i, caption(SUBFIELDS[i % 6], i % 6, i % 3, rng, case=i), name, "quilt", "train"])
    return out / "quilt_1M_lookup.csv"


def _child(task: str, src: str, work: str, engine: str, images: str = "copy") -> None:
    """One measurement in its own process: prints a JSON line with seconds and peak RSS."""
    import resource

    from patho_r1.curate.config import DedupStage, ImportStage, TagStage
    from patho_r1.curate.pipeline import run_stage

    work_dir = Path(work)
    start = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if task.startswith("import"):
        # resume=False: a rerun over the same work folder measures the work, not a skipped stage
        imported = run_stage(ImportStage(sources=[{"format": "quilt-1m", "path": src}], images=images,
                                         engine=engine), None, work_dir / "import", resume=False)
        t1 = time.perf_counter()
    if task == "import":
        extra = {"import_s": t1 - t0, "engine": imported.counts["engine"]}
    elif task == "import+dedup":
        manifest = run_stage(DedupStage(engine=engine), work_dir / "import", work_dir / "dedup", resume=False)
        extra = {"import_s": t1 - t0, "dedup_s": time.perf_counter() - t1, "removed": manifest.counts["removed"],
                 "engine": f"{imported.counts['engine']}/{manifest.counts['engine']}"}
    else:
        manifest = run_stage(TagStage(seed=None, keyword_labels=True, review=0, engine=engine), Path(src),
                             work_dir / f"tag-{engine}", resume=False)
        extra = {"subfields": manifest.counts["subfields"]}
    seconds = time.perf_counter() - t0
    me, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of this process and its (finished) pool workers: on a shared machine the wall clock also counts
    # the time a process waited for a core
    cpu = me.ru_utime + me.ru_stime - start.ru_utime - start.ru_stime + workers.ru_utime + workers.ru_stime
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": me.ru_maxrss / 1024,
                      "worker_peak_mb": workers.ru_maxrss / 1024, **extra}))  # the largest pool worker's


def measure(task: str, src: Path, work: Path, engine: str, images: str = "copy") -> dict:
    if task.startswith("import"):  # an earlier run's folders: deleted here, not inside the timed stages
        shutil.rmtree(work, ignore_errors=True)
        # and the deletion written out: removing 1M hard links dirties 1M source inodes, whose writeback during the
        # next run cut its import from 32k to 11k rows/s on the 2-core test machine
        os.sync()
    out = subprocess.run([sys.executable, __file__, "--child", task, str(src), str(work), engine, images],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def versus_datasketch(import_dir: Path, n: int) -> tuple[float, float]:
    """Rows per second for signatures + LSH bucketing: ours (batched, sorted bands) and datasketch's per-row API."""
    from datasketch import MinHash, MinHashLSH

    from patho_r1.curate.dedup import find_duplicates
    from patho_r1.curate.minhash import band_keys, lsh_params, shingles, signatures

    texts = []
    with (import_dir / "caption.jsonl").open() as fh:
        for line, _ in zip(fh, range(n), strict=False):
            texts.append(json.loads(line)["caption"])
    t0 = time.perf_counter()
    sigs = signatures(texts, 64)
    b, r = lsh_params(0.8, 64)
    find_duplicates(sigs, band_keys(sigs, b, r), np.zeros(len(texts), np.uint64), np.ones(len(texts), bool), 0.8)
    ours = len(texts) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=0.8, num_perm=64)
    for i, text in enumerate(texts):
        m = MinHash(num_perm=64)
        m.update_batch([s.encode() for s in shingles(text)])
        lsh.insert(i, m, check_duplication=False)
    theirs = len(texts) / (time.perf_counter() - t0)
    return ours, theirs


def main() -> None:
    from patho_r1.curate.config import ENGINES

    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(*sys.argv[2:7])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--images", type=int, default=2_000, help="rendered tiles the image files draw on")
    parser.add_argument("--tag-rows", type=int, default=100_000, help="rows for the tagging measurement")
    parser.add_argument("--engine", default="auto", choices=ENGINES, help="for import, dedup and tagging")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--filter-rows", type=int, default=1_000_000)
    parser.add_argument("--teacher-requests", type=int, default=600)
    parser.add_argument("--only", nargs="+", choices=["corpus", "import", "teacher", "filter"],
                        default=["corpus", "teacher", "filter"])
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; image pool: {args.images}")
    base = Path(args.workdir or tempfile.mkdtemp(prefix="patho-curate-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    if "corpus" in args.only:
        corpus(args, base)
    if "import" in args.only:
        import_rates(args, base)
    if "teacher" in args.only:
        teacher_rates(args.teacher_requests)
    if "filter" in args.only:
        filter_rate(base, args.filter_rows)
    print(f"work folder: {base}")


def teacher_rates(n: int) -> None:
    from patho_r1.curate.grid import PromptGrid
    from patho_r1.fixtures.teacher import serve
    from patho_r1.llm import ChatRequest, EndpointConfig, LLMClient, run

    grid = PromptGrid()
    prompts = [grid.render("histopathology/medium/reasoning", caption=f"H&E section, case {i}: consistent with "
                           f"adenocarcinoma (colon, case {i}, patient aged 60).") for i in range(n)]
    for delay in (0.0, 0.05):
        server = serve(delay_s=delay)
        rates = {}
        for concurrency in (1, 8, 32):
            endpoint = EndpointConfig(base_url=server.url, model="scripted", concurrency=concurrency)
            count = n if delay == 0 or concurrency > 1 else n // 8

            async def go(endpoint=endpoint, count=count):
                async with LLMClient(endpoint) as client:
                    t0 = time.perf_counter()
                    await client.map((ChatRequest(i, [{"role": "user", "content": prompts[i]}])
                                      for i in range(count)), lambda r, res: None)
                    return count / (time.perf_counter() - t0)

            rates[concurrency] = run(go())
        server.stop()
        print(f"teacher requests/s (replies take {delay * 1000:.0f} ms): "
              + ", ".join(f"concurrency {c}: {r:,.0f} ({r / rates[1]:.1f}x)" for c, r in rates.items()))


def filter_rate(base: Path, n: int) -> None:
    from patho_r1.curate.config import FilterStage
    from patho_r1.curate.pipeline import run_stage
    from patho_r1.fixtures.synth import TISSUES
    from patho_r1.fixtures.teacher import FLAWS, scripted_reply

    src = base / f"teacher-{n}.jsonl"
    if not src.exists():
        from patho_r1.curate.grid import PromptGrid

        grid, tasks = PromptGrid(), ("mcq", "description", "reasoning", "conversation")
        organs = ("colon", "lung", "breast", "liver", "skin", "kidney")
        # 2,400 distinct replies (tasks x tissues x organs x flaws), each reused with its own id and case number
        templates = []
        for i in range(2400):
            t, tissue = tasks[i % 4], TISSUES[i // 4 % 6]
            cap = f"Figure: {tissue.name} ({organs[i // 24 % 6]}, case {i}, patient aged {20 + i % 70})."
            flaw = FLAWS[i // 10 % len(FLAWS)] if i % 10 == 0 else None
            text, _, finish = scripted_reply(grid.render(f"histopathology/medium/{t}", caption=cap), flaw)
            templates.append((t, text, finish, tissue.name))
        rng = np.random.default_rng(0)
        vocab = [f"w{k}" for k in range(5000)]
        with src.open("w") as fh:
            for j in range(n):
                t, text, finish, gold = templates[j % len(templates)]
                # a sentence of its own in the think, so that outputs are not near-copies of one another
                extra = " ".join(vocab[k] for k in rng.integers(0, len(vocab), 16))
                text = text.replace("</think>", f" Also noted: {extra}.</think>", 1)
                fh.write(json.dumps({"id": f"r{j}", "task": t, "response": text, "finish_reason": finish,
                                     "gold": gold, "subfield": "histopathology"}) + "\n")
    t0, cpu0 = time.perf_counter(), time.process_time()
    manifest = run_stage(FilterStage(input=str(src)), None, base / f"filtered-{n}", resume=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    # CPU seconds as well: on a shared machine the wall clock also counts time the process was waiting for a core
    print(f"filter: {n:,} outputs in {seconds:.1f} s = {n / seconds:,.0f} rows/s, {n / cpu:,.0f} rows per CPU "
          f"second (goal 20,000 on one core); kept {manifest.counts['kept']:,}, rejected by rule "
          f"{manifest.counts['rejected_by_rule']}")


def import_rates(args, base: Path) -> None:
    """(1) without the dedup: the import alone (each row's image checked and stored, its id checked), and the image
    check's own cost per image, on the export's files."""
    for n in args.rows:
        src = write_export(base / f"src-{n}", n, args.images)
        for images in ("copy", "link"):
            r = measure("import", src, base / f"work-{n}-{images}", args.engine, images)
            print(f"{n:>9,} rows  import ({images} images, {r['engine']}) {n / r['import_s']:>9,.0f} rows/s "
                  f"(goal >= 20,000 on 2 cores), {n / r['cpu_s']:,.0f} rows per CPU second  peak RSS "
                  f"{r['peak_rss_mb']:,.0f} MB (driver)")
    try:
        from patho_r1.curate.store import image_problem
    except ImportError:  # a checkout from before the check
        return
    from PIL import Image

    files = sorted((base / f"src-{args.rows[0]}" / "images" / "000").iterdir())[:2000]
    blobs = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    problems = sum(image_problem(b, Image.MAX_IMAGE_PIXELS) is not None for b in blobs)
    seconds = time.perf_counter() - t0
    print(f"image check: {seconds / len(blobs) * 1e6:.1f} us an image ({len(blobs)} PNGs of "
          f"{sum(map(len, blobs)) // len(blobs):,} bytes; {problems} refused) in one process")


def corpus(args, base: Path) -> None:
    results = {}
    for n in args.rows:
        src = write_export(base / f"src-{n}", n, args.images)
        for images in ("copy", "link"):
            r = measure("import+dedup", src, base / f"work-{n}-{images}", args.engine, images)
            results.setdefault(images, {})[n] = r
            print(f"{n:>9,} rows  import+dedup ({images} images, {r['engine']}) {n / r['seconds']:>9,.0f} rows/s  "
                  f"(import {n / r['import_s']:,.0f}, dedup {n / r['dedup_s']:,.0f})  peak RSS "
                  f"{r['peak_rss_mb']:,.0f} MB (driver), {r['worker_peak_mb']:,.0f} MB (largest worker)  removed "
                  f"{r['removed']}")
        if n == args.rows[0] and args.engine == "auto":  # the pool against one process, in this run
            r = measure("import+dedup", src, base / f"work-{n}-link-local", "local", "link")
            print(f"{n:>9,} rows  import+dedup (link images, local) {n / r['seconds']:>9,.0f} rows/s: auto's "
                  f"{results['link'][n]['seconds'] / r['seconds']:.2f}x of the time in one process")
    sizes = sorted(results["copy"])
    if len(sizes) > 1:
        for images, by_size in results.items():
            ratio = by_size[sizes[-1]]["peak_rss_mb"] / by_size[sizes[0]]["peak_rss_mb"]
            print(f"peak memory ({images}) {sizes[-1]:,} / {sizes[0]:,} rows: {ratio:.2f}x for "
                  f"{sizes[-1] / sizes[0]:.0f}x the rows")
    smallest = sizes[0]
    ours, theirs = versus_datasketch(base / f"work-{smallest}-copy/import", min(smallest, 50_000))
    print(f"signatures + LSH on {min(smallest, 50_000):,} captions: ours {ours:,.0f} rows/s, datasketch per row "
          f"{theirs:,.0f} rows/s: {ours / theirs:.1f}x")
    tag_src = base / "tag-src"
    if not (tag_src / "caption.jsonl").exists():
        write_export(base / "tag-raw", args.tag_rows, args.images)
        from patho_r1.curate.config import ImportStage
        from patho_r1.curate.pipeline import run_stage

        run_stage(ImportStage(sources=[{"format": "quilt-1m", "path": str(base / "tag-raw/quilt_1M_lookup.csv")}]),
                  None, tag_src)
    for engine in ("local", "ray"):
        r = measure("tag", tag_src, base, engine)
        print(f"tag ({engine:5s}) {args.tag_rows:,} rows: {args.tag_rows / r['seconds']:,.0f} rows/s  peak RSS "
              f"{r['peak_rss_mb']:,.0f} MB (driver)")


if __name__ == "__main__":
    main()
