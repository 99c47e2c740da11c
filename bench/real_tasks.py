"""Every method against PEFT LoRA on real public tasks (not the bundled synthetic data), several seeds.

The data is not in this repository and not on the model hub: it is read at benchmark time from
public GitHub repositories that carry the GLUE files, fetched beforehand as bare git directories
(for example with the session's ``fetch`` tool, or ``git clone --bare``), and pinned by commit and
blob, so every number names exactly the rows it came from:

    python bench/real_tasks.py --mirror /work/.mirror            # SST-2 and MRPC, 3 seeds
    python bench/real_tasks.py --tasks mrpc --seeds 0 --max-steps 2   # smoke run

Each task is extracted to ``--cache-dir`` (outside the repository) as JSON lines, checked against
the pinned blob id, and handed to ``bench/compare_methods.py`` (one process per run, the packaged
MiniLM, the methods' tuned defaults). Results go to ``bench/results/real_tasks/<task>/compare.json``
with the provenance recorded beside the runs.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python bench/real_tasks.py`: import from the repository root, not bench/
    sys.path[:] = [str(Path(__file__).resolve().parents[1])] + [
        p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from bench.common import RESULTS_DIR  # noqa: E402

DOC_START, DOC_END = "<!-- real-tasks:start -->", "<!-- real-tasks:end -->"
CACHE = Path.home() / ".cache" / "peft-lowrank-ext" / "real-tasks"


@dataclass(frozen=True)
class Source:
    """One GLUE file in a public repository, pinned by commit and blob id."""

    repo: str
    commit: str
    path: str
    blob: str


@dataclass(frozen=True)
class Task:
    name: str
    train: Source
    eval: Source
    #: column index -> our column name, for the headerless/headed TSV layouts of these files
    columns: dict
    header: bool
    max_train: int
    notes: str
    #: "tsv" (GLUE) or "label_first" (one example per line: the label, a space, the sentence)
    layout: str = "tsv"


TASKS = {
    "sst2": Task(
        name="SST-2 (GLUE): single sentence, 2 classes",
        train=Source("eyalbd2/Reproducing-AutoPrompt", "6288fb5bec9c572f2492875ae0111df5b6daed11",
                     "glue_data/SST-2/train_full.tsv", "781e7d9833b405de7d1faff982d040c30be79fd5"),
        eval=Source("eyalbd2/Reproducing-AutoPrompt", "6288fb5bec9c572f2492875ae0111df5b6daed11",
                    "glue_data/SST-2/dev.tsv", "b1285ff5696fd163af4737dfd5adf134525d2296"),
        columns={0: "sentence", 1: "label"}, header=True, max_train=1000,
        notes="GLUE SST-2 train (67,349 rows, shuffled with seed 0; the first --max-train-samples used) and the "
              "GLUE dev set (872 rows)"),
    "sst5": Task(
        name="SST-5 (Stanford Sentiment Treebank, sentence level): single sentence, 5 classes",
        train=Source("y3nk0/Theano-CNN", "ea2085234dcde7d28be6cf05f3affa4292f420dc", "data/stsa.fine.train",
                     "7435cc6b449fc6bc50ace422b47b1ee69080ebb6"),
        eval=Source("y3nk0/Theano-CNN", "ea2085234dcde7d28be6cf05f3affa4292f420dc", "data/stsa.fine.dev",
                    "c20389d69d2506df15f82a514733fde37be3cbb5"),
        columns={0: "label", 1: "sentence"}, header=False, max_train=1000, layout="label_first",
        notes="SST-5 sentence-level train (8,544 rows, shuffled with seed 0; the first --max-train-samples used) "
              "and dev (1,101 rows), in the 'stsa.fine' files of Kim (2014)'s CNN data"),
    "mrpc": Task(
        name="MRPC (GLUE): sentence pairs, 2 classes",
        train=Source("mieseung/Cutoff_with_Attribution", "ef73992bd58bb6ff3c7cffc314fb88f6c6779df7",
                     "glue_data/MRPC/train.tsv", "97f08e8a80c8544309d156203a01ca914686970f"),
        eval=Source("mieseung/Cutoff_with_Attribution", "ef73992bd58bb6ff3c7cffc314fb88f6c6779df7",
                    "glue_data/MRPC/dev.tsv", "0fbbe853f76d8563eb74596b387b5a2be2db2795"),
        columns={0: "label", 3: "sentence1", 4: "sentence2"}, header=False, max_train=1000,
        notes="MRPC: the 4,076-pair MSR Paraphrase training file as that repository splits it, headerless: 2,576 "
              "train (shuffled with seed 0; the first --max-train-samples used) / 1,500 evaluation rows; not "
              "GLUE's 408-row dev set"),
}


def git_dir(mirror: Path, repo: str) -> Path:
    return mirror / repo.replace("/", "+") / "repo"


def read_blob(mirror: Path, src: Source) -> tuple[bytes, str]:
    """The file's bytes, checked against the pinned blob id; and the commit it resolved to."""
    where = git_dir(mirror, src.repo)
    if not where.exists():
        raise SystemExit(f"--mirror: {where} is missing; fetch github:{src.repo} first (a bare git directory)")
    commit = subprocess.run(["git", "-C", str(where), "rev-parse", src.commit], capture_output=True, text=True,
                            check=True).stdout.strip()
    blob = subprocess.run(["git", "-C", str(where), "rev-parse", f"{commit}:{src.path}"], capture_output=True,
                          text=True, check=True).stdout.strip()
    if blob != src.blob:
        raise SystemExit(f"{src.repo}:{src.path} at {commit} is blob {blob}, not the pinned {src.blob}")
    data = subprocess.run(["git", "-C", str(where), "cat-file", "blob", blob], capture_output=True,
                          check=True).stdout
    return data, commit


def tsv_rows(data: bytes, task: Task) -> list[dict]:
    """GLUE TSV (no quoting: sentences contain quote characters) -> records with our column names."""
    lines = data.decode("utf-8").splitlines()
    if task.layout == "label_first":
        return [{"label": int(line.split(" ", 1)[0]), "sentence": line.split(" ", 1)[1].strip()}
                for line in lines if line.strip()]
    reader = csv.reader(lines[1:] if task.header else lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = []
    for fields in reader:
        if not fields:
            continue
        rec = {name: fields[i].strip() for i, name in task.columns.items()}
        rec["label"] = int(rec["label"])
        rows.append(rec)
    return rows


def extract(task_key: str, mirror: Path, cache: Path) -> dict:
    """Write the task's train/eval JSON lines into ``cache``; return the provenance record."""
    task = TASKS[task_key]
    out = {"task": task.name, "notes": task.notes, "files": {}}
    target = cache / task_key
    target.mkdir(parents=True, exist_ok=True)
    for split, src in (("train", task.train), ("eval", task.eval)):
        data, commit = read_blob(mirror, src)
        rows = tsv_rows(data, task)
        if split == "train":  # compare_methods takes the first --max-train-samples rows: a seeded draw
            random.Random(0).shuffle(rows)
        path = target / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out["files"][split] = {"repo": f"github:{src.repo}", "commit": commit, "path": src.path, "blob": src.blob,
                               "sha256": hashlib.sha256(data).hexdigest(), "rows": len(rows),
                               "local": str(path)}
    return out


GOALS = {"rlora": "within 1 point of LoRA r=8 at ≤ 10% of its parameters",
         "autolora": "≥ LoRA r=8 at ≤ its parameters", "prilora": "≥ LoRA r=8 at ≤ its parameters",
         "heterolora_static": "≥ LoRA r=8 at ≤ its parameters"}


def _active_params(method: str, row: dict, runs: list[dict]) -> int:
    """Parameters that train: HeteroLoRA's switched-off candidates hold parameters but no gradient."""
    if method.startswith("heterolora"):
        run = next(r for r in runs if r["method"] == method)
        cfg = run["settings"]["config"]
        per_module = 2 * 384 * cfg["r"]  # MiniLM: every candidate projection is 384 -> 384
        head = row["trainable_params"] - per_module * 4 * 6  # 4 candidate projections x 6 layers
        return head + per_module * int(cfg["budget"] * 4 * 6)
    return int(row["trainable_params"])


def render(output_dir: Path) -> str:
    """One Markdown table per task: median accuracy (min–max) over seeds, parameters, against LoRA r=8."""
    out = []
    for task_dir in sorted(p for p in output_dir.iterdir() if (p / "compare.json").exists()):
        data = json.loads((task_dir / "compare.json").read_text())
        prov = json.loads((task_dir / "provenance.json").read_text())
        summary, runs = data["summary"], data["runs"]
        ref = summary.get("lora_r8")
        files = prov["files"]
        out.append(f"### {prov['task']}\n")
        out.append(f"Data: {files['train']['repo']} @ {files['train']['commit'][:10]} `{files['train']['path']}` / "
                   f"`{files['eval']['path']}` (sha256 {files['train']['sha256'][:12]}… / "
                   f"{files['eval']['sha256'][:12]}…); {prov['notes']}. Command: `{data['command']}`; "
                   f"{data['date_start'][:10]}, {data['machine'].get('cpu', '')} "
                   f"{data['machine'].get('torch', '')}.\n")
        out.append("| method | accuracy, median (min–max) | seeds | trainable params (training) | "
                   "vs LoRA r=8 | goal |")
        out.append("| --- | --- | --- | --- | --- | --- |")
        for method, row in summary.items():
            active = _active_params(method, row, runs)
            delta = "" if ref is None or method == "lora_r8" else \
                f"{100 * (row['accuracy_median'] - ref['accuracy_median']):+.1f} pt, " \
                f"{100 * active / _active_params('lora_r8', ref, runs):.0f}% params"
            goal = GOALS.get(method, "")
            if goal and ref is not None:
                ok = row["accuracy_median"] >= ref["accuracy_median"] - (0.01 if method == "rlora" else 0.0)
                ok = ok and active <= (0.1 if method == "rlora" else 1.0) * _active_params("lora_r8", ref, runs)
                goal = ("met: " if ok else "missed: ") + goal
            out.append(f"| {method} | {100 * row['accuracy_median']:.1f}% ({100 * row['accuracy_min']:.1f}–"
                       f"{100 * row['accuracy_max']:.1f}) | {row['n_seeds']} | {active:,} | {delta} | {goal} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mirror", type=Path, default=Path("/work/.mirror"), help="folder of fetched bare git dirs")
    p.add_argument("--cache-dir", type=Path, default=CACHE, help="where the extracted files go (not the repo)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=["sst2", "mrpc"])
    p.add_argument("--output-dir", type=Path, default=RESULTS_DIR / "real_tasks")
    p.add_argument("--extract-only", action="store_true")
    p.add_argument("--render-only", action="store_true", help="only write summary.md from finished runs")
    args, rest = p.parse_known_args(argv)
    if args.render_only:
        text = render(args.output_dir)
        (args.output_dir / "summary.md").write_text(text)
        docs = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        page = docs.read_text()
        if DOC_START in page and DOC_END in page:  # the real-task section of docs/benchmarks.md
            head, rest = page.split(DOC_START, 1)
            docs.write_text(head + DOC_START + "\n" + text + "\n" + DOC_END + rest.split(DOC_END, 1)[1])
        print(text)
        return 0
    from bench import compare_methods

    for key in args.tasks:
        provenance = extract(key, args.mirror, args.cache_dir)
        out_dir = args.output_dir / key
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2))
        print(f"{key}: {provenance['files']['train']['rows']} train / {provenance['files']['eval']['rows']} eval "
              f"rows from {provenance['files']['train']['repo']}", flush=True)
        if args.extract_only:
            continue
        task = TASKS[key]
        files = provenance["files"]
        cmd = ["--train-file", files["train"]["local"], "--eval-file", files["eval"]["local"],
               "--text-column", "sentence" if "sentence" in task.columns.values() else "sentence1",
               "--output-dir", str(out_dir)]
        if "--max-train-samples" not in rest:
            cmd += ["--max-train-samples", str(task.max_train)]
        if "sentence2" in task.columns.values():
            cmd += ["--text-pair-column", "sentence2"]
        rc = compare_methods.main(cmd + rest)
        if rc:
            return rc
    if not args.extract_only:
        (args.output_dir / "summary.md").write_text(render(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
