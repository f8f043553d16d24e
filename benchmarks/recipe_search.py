# SPDX-License-Identifier: Apache-2.0
"""
Recipe search on one GPU: a batch of candidate recipes trained at once, each scored as the bundles score a model.

    python -m benchmarks.recipe_search                          # the 'first' group of candidates, on the GPU
    python -m benchmarks.recipe_search --only unet-poly,dnet-poly --minutes 6
    python -m benchmarks.recipe_search --device cpu --quick     # the smoke test: 2 candidates, tiny budgets

Candidates are data (``benchmarks/recipe_candidates.json``, ``--candidates``): each training candidate is a bundle
and named config overrides, applied at run time with MONAI's ``ConfigParser`` to the bundle's ``train.json`` (and to
its ``evaluate.json`` for scoring): ``set`` (config ids replaced), ``insert`` (items added to a config list after
the item of a given ``_target_``), ``wrap`` (a config entry nested into another component, such as the validation
inferer into ``bundletools.inferers.MirroredInferer``), trained once per seed of ``seeds``; ``evaluations`` score the
same model again with evaluation-time overrides (``<candidate>+<evaluation>``). Derived candidates need no
training: ``ensemble`` averages the class probabilities of listed results (``name@seed``), ``postprocess``
(``largest_component``: each label's largest connected component) applies to every seed of ``from``.

Every training runs in a process of its own, all at once (``--parallel``, default: all of them on a GPU, one at a
time on a CPU), each with ``--minutes`` of wall-clock training (``time_budget_s``: the clock starts after the data
are cached; the bundle keeps its best validation checkpoint), then ``evaluate.json`` on the bundle's validation
split (``split_seed`` 0: the 42 Task04 cases) in each scan's original grid, saving the class probabilities there
for the derived candidates. The plan must fit ``--max_minutes`` of wall clock (10, one GPU session's command):
``ceil(trainings / parallel) * (minutes + --overhead_s)`` plus a minute for the derived candidates; whatever is
still running at the deadline is stopped and reported as such.

Every candidate scored is appended to ``--out``/``recipe_search.csv`` (date, device, candidate, recipe, seed,
training seconds, epochs, Dice and HD95 per label, status; losers too), and ``recipe_search.md`` is written anew
from the whole CSV, newest search first. Ranking recipes on the validation split selects on it: confirm a winner
with new seeds (``benchmarks/collection.py --seeds``) before calling its figure a result.

On the lent GPU machine (no registry, no ITK): ``bash ../shared/tools/device-prep.sh Task04_Hippocampus`` here,
then there ``source .device/env.sh && python -m benchmarks.recipe_search --out $OUT``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent

CANDIDATES = BENCHMARKS / "recipe_candidates.json"
FIELDS = ["date", "device", "parallel", "candidate", "bundle", "about", "recipe", "seed", "budget_min", "train_s",
          "epochs", "dice_mean", "dice_anterior", "dice_posterior", "hd95_mean_mm", "hd95_anterior_mm",
          "hd95_posterior_mm", "status", "command"]
DERIVED_S = 60  # the derived candidates: reading and averaging saved probabilities, scoring


# ------------------------------------------------------------------------------------------ candidates as data
def load_candidates(path: Path) -> dict:
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    names = [c["name"] for c in spec["training"]] + [c["name"] for c in spec.get("derived", [])]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: candidate names must be unique")
    return spec


def apply_overrides(parser, overrides: dict) -> None:
    """``set``, then ``insert``, then ``wrap`` of one candidate or evaluation, on a ``ConfigParser``."""
    for key, value in overrides.get("set", {}).items():
        parser[key] = copy.deepcopy(value)
    for insert in overrides.get("insert", []):
        items = copy.deepcopy(parser[insert["into"]])
        if not isinstance(items, list):
            raise ValueError(f"insert into {insert['into']}: not a list in the config")
        at = len(items)
        if "after" in insert:
            targets = [i for i, item in enumerate(items) if isinstance(item, dict) and
                       item.get("_target_", "").split(".")[-1] == insert["after"]]
            if not targets:
                raise ValueError(f"insert into {insert['into']}: no item with _target_ {insert['after']}")
            at = targets[-1] + 1
        parser[insert["into"]] = items[:at] + copy.deepcopy(insert["items"]) + items[at:]
    for wrap in overrides.get("wrap", []):
        parser[wrap["id"]] = {**copy.deepcopy(wrap["in"]), wrap["as"]: copy.deepcopy(parser[wrap["id"]])}


def recipe_text(candidate: dict) -> str:
    """The overrides of a candidate, compact, for the CSV."""
    keys = ("set", "insert", "wrap", "evaluations", "ensemble", "from", "postprocess")
    return json.dumps({k: candidate[k] for k in keys if k in candidate}, separators=(",", ":"))


# --------------------------------------------------------------------------------------- one training (child)
def _bundle_parser(candidate: dict, files: list[str], args, work: Path, seed: int):
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / candidate["bundle"] / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in files])
    base = {"bundle_root": str(work), "ckpt_dir": str(work / "models"), "device": f"$torch.device('{args.device}')",
            "seed": seed, "epochs": 100000, "time_budget_s": args.minutes * 60}
    if args.dataset_dir:
        base["dataset_dir"] = args.dataset_dir
    parser.update(base)
    if args.quick:  # the smoke test: at most 10 cases, two iterations per epoch
        parser.update({"max_cases": 10, "train#trainer#epoch_length": 2})
    apply_overrides(parser, candidate)
    return parser


def train_and_score(candidate: dict, seed: int, args) -> list[dict]:
    """Train one candidate with one seed in this process, then score it (and its evaluations) on the validation
    split, saving the class probabilities in each scan's original grid for the derived candidates."""
    import torch
    from ignite.engine import Events

    from benchmarks.train_budget import per_class

    torch.set_num_threads(args.threads)
    work = Path(args.work_dir) / candidate["name"] / f"seed{seed}"
    parser = _bundle_parser(candidate, ["train.json"], args, work, seed)
    for _ in parser.get_parsed_content("initialize"):
        pass
    trainer = parser.get_parsed_content("train#trainer")
    marks = {}
    trainer.add_event_handler(Events.STARTED, lambda e: marks.__setitem__("start", time.perf_counter()))
    trainer.add_event_handler(Events.COMPLETED, lambda e: marks.__setitem__("end", time.perf_counter()))
    parser.get_parsed_content("run")
    train_s = round(marks["end"] - marks["start"], 1)
    epochs = trainer.state.epoch - (1 if trainer.state.iteration % trainer.state.epoch_length else 0)
    common = {"candidate": candidate["name"], "bundle": candidate["bundle"], "seed": str(seed), "train_s": train_s,
              "epochs": epochs}
    if not (work / "models" / "model.pt").is_file():
        return [{**common, "id": f"{candidate['name']}@{seed}", "status": "no epoch finished within the budget"}]

    rows = []
    for variant, overrides in [("", {}), *candidate.get("evaluations", {}).items()]:
        name = candidate["name"] + (f"+{variant}" if variant else "")
        evaluation = _bundle_parser(candidate, ["train.json", "evaluate.json"], args, work, seed)
        apply_overrides(evaluation, overrides)
        out = work / f"eval{'-' + variant if variant else ''}"
        evaluation["output_dir"] = str(out)
        apply_overrides(evaluation, {"insert": [{"into": "validate#postprocessing#transforms", "after": "Invertd",
                                                 "items": [_probability_saver(out / "probabilities")]}]})
        evaluation.get_parsed_content("validate#evaluator").run()
        dice, hd95 = per_class(out / "val_mean_dice_summary.csv"), per_class(out / "val_hd95_mm_summary.csv")
        rows.append({**common, "id": f"{name}@{seed}", "candidate": name, "status": "ok",
                     "probabilities": str(out / "probabilities"), **_metric_columns(dice, hd95)})
    return rows


def _probability_saver(folder: Path) -> dict:
    """The softmax output, inverted to the scan's grid, as ``<case>_prob.nii.gz`` (one channel per class)."""
    return {"_target_": "SaveImaged", "keys": "pred", "output_dir": str(folder), "output_postfix": "prob",
            "output_dtype": "$numpy.float32", "resample": False, "separate_folder": False, "print_log": False}


def _metric_columns(dice: dict, hd95: dict) -> dict:
    return {**{f"dice_{k}": round(v, 4) for k, v in dice.items()}, **{f"hd95_{k}_mm": round(v, 4) for k, v in hd95.items()}}


# ------------------------------------------------------------------------------ derived candidates (parent)
def _case_probabilities(folder: str) -> dict[str, Path]:
    return {p.name.removesuffix("_prob.nii.gz"): p for p in Path(folder).glob("*_prob.nii.gz")}


def largest_component(labels, num_classes: int):
    """Each foreground label reduced to its largest connected component (face connectivity); the rest background."""
    import numpy as np
    from scipy import ndimage

    out = np.zeros_like(labels)
    for c in range(1, num_classes):
        components, count = ndimage.label(labels == c)
        if count:
            sizes = np.bincount(components.ravel())[1:]
            out[components == 1 + int(np.argmax(sizes))] = c
    return out


def score_derived(derived: dict, sources: list[dict], labels: dict[str, str], folder: Path) -> dict:
    """Average the class probabilities of ``sources`` per case (one source: as it is), take the argmax, apply the
    postprocessing, write the segmentations and score them against ``labels`` (case -> label file)."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import LoadImage

    from benchmarks.scoring import score_segmentations

    load = LoadImage(image_only=True, ensure_channel_first=True)
    per_source = [_case_probabilities(s["probabilities"]) for s in sources]
    cases = sorted(set.intersection(*[set(p) for p in per_source]))
    if set(cases) != set(labels):
        raise RuntimeError(f"{derived['name']}: probabilities for {len(cases)} of {len(labels)} scored cases")
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for case in cases:
        maps = [load(p[case]) for p in per_source]
        mean_probabilities = sum(np.asarray(m) for m in maps) / len(maps)
        segmentation = np.argmax(mean_probabilities, axis=0).astype(np.uint8)
        if derived.get("postprocess") == "largest_component":
            segmentation = largest_component(segmentation, mean_probabilities.shape[0])
        path = folder / f"{case}_seg.nii.gz"
        nib.save(nib.Nifti1Image(segmentation, np.asarray(maps[0].affine)), path)
        pairs.append((path, labels[case]))
    dice, hd95 = score_segmentations(pairs, folder / "eval", mean_probabilities.shape[0], ["anterior", "posterior"])
    return _metric_columns(dice, hd95)


def derived_runs(spec: dict, results: dict[str, dict]) -> list[tuple[dict, list[dict], str]]:
    """(derived candidate, its sources, seed label) for every derived candidate whose sources were all scored."""
    runs = []
    for derived in spec.get("derived", []):
        if "ensemble" in derived:
            sources = [results.get(ref) for ref in derived["ensemble"]]
            if all(s and s["status"] == "ok" for s in sources):
                runs.append((derived, sources, ",".join(ref.split("@")[1] for ref in derived["ensemble"])))
        else:
            for ref, source in results.items():
                if ref.split("@")[0] == derived["from"] and source["status"] == "ok":
                    runs.append((derived, [source], source["seed"]))
    return runs


# ---------------------------------------------------------------------------------------- orchestration
def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def _validation_labels(candidate: dict, args) -> dict[str, str]:
    """case -> label file of the scored split (the first training candidate's bundle's validation split)."""
    parser = _bundle_parser(candidate, ["train.json"], args, Path(args.work_dir), 0)
    return {Path(c["image"]).name.removesuffix(".nii.gz"): c["label"]
            for c in parser.get_parsed_content("datalist")["validation"]}


def run_search(args, spec: dict, chosen: list[dict]) -> list[dict]:
    """Start every training, wait for them (stopping those still running at the deadline), score the derived
    candidates; returns one row per result."""
    deadline = time.monotonic() + args.max_minutes * 60 - DERIVED_S
    jobs = [(c, s) for c in chosen for s in (c["seeds"][:1] if args.quick else c["seeds"])]
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    waiting, running, results = list(jobs), [], {}
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    while waiting or running:
        while waiting and len(running) < args.parallel:
            candidate, seed = waiting.pop(0)
            out = Path(args.work_dir) / candidate["name"] / f"seed{seed}"
            out.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "benchmarks.recipe_search", "--child", candidate["name"], "--seed", str(seed), "--threads",
                       str(threads), *_shared_args(args)]
            log = open(out / "child.log", "w", encoding="utf-8")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                       OMP_NUM_THREADS=str(threads))
            running.append((candidate, seed, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                              cwd=REPO),
                            log, out))
            print(f"started {candidate['name']} seed {seed} ({threads} threads)", flush=True)
        time.sleep(2)
        for job in list(running):
            candidate, seed, proc, log, out = job
            late = time.monotonic() > deadline
            if proc.poll() is None and not late:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
            running.remove(job)
            rows = _child_rows(candidate, seed, proc.returncode, out, late)
            for row in rows:
                results[row["id"]] = row
                print(f"{row['id']}: {row['status']}, Dice {row.get('dice_mean', '–')}", flush=True)
    labels = _validation_labels(chosen[0], args)
    for derived, sources, seeds in derived_runs(spec, results):
        folder = Path(args.work_dir) / "derived" / derived["name"].replace(" ", "_").replace(",", "") / seeds
        row = {"id": f"{derived['name']}@{seeds}", "candidate": derived["name"],
               "bundle": "+".join(dict.fromkeys(s["bundle"] for s in sources)), "seed": seeds,
               "train_s": max(s["train_s"] for s in sources), "epochs": None}
        try:
            row.update(status="ok", **score_derived(derived, sources, labels, folder))
        except Exception as e:  # one derived candidate's failure must not lose the others' rows
            row["status"] = f"failed: {e}"
        results[row["id"]] = row
        print(f"{row['id']}: {row['status']}, Dice {row.get('dice_mean', '–')}", flush=True)
    return list(results.values())


def _child_rows(candidate: dict, seed: int, returncode: int, out: Path, late: bool) -> list[dict]:
    result = out / "result.json"
    if returncode == 0 and result.is_file():
        return json.loads(result.read_text(encoding="utf-8"))
    status = "stopped at the search's deadline" if late else f"failed (exit {returncode}); see {out / 'child.log'}"
    return [{"id": f"{candidate['name']}@{seed}", "candidate": candidate["name"], "bundle": candidate["bundle"],
             "seed": str(seed), "status": status}]


def _shared_args(args) -> list[str]:
    shared = ["--device", args.device, "--minutes", str(args.minutes), "--work_dir", args.work_dir,
              "--candidates", str(args.candidates)]
    if args.dataset_dir:
        shared += ["--dataset_dir", args.dataset_dir]
    if args.quick:
        shared.append("--quick")
    return shared


def write_outputs(rows: list[dict], spec_by_name: dict, args, device: str, command: str) -> None:
    """Append the rows to recipe_search.csv, then write recipe_search.md from the whole CSV."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "recipe_search.csv"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    new_file = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        for row in rows:
            # an evaluation's row ("<candidate>+<evaluation>") is described by its training candidate
            candidate = spec_by_name.get(row["candidate"]) or spec_by_name.get(row["candidate"].rsplit("+", 1)[0], {})
            writer.writerow({**row, "date": date, "device": device, "parallel": args.parallel,
                             "about": candidate.get("about", ""), "recipe": recipe_text(candidate),
                             "budget_min": args.minutes, "command": command})
    with open(path, newline="", encoding="utf-8") as f:
        history = list(csv.DictReader(f))
    lines = ["# Recipe search: every candidate tried", "",
             f"Written by `benchmarks/recipe_search.py` from [`recipe_search.csv`](recipe_search.csv) (each row's "
             "recipe is there in full). Dice and HD95 of the best validation checkpoint on the bundle's validation "
             "split in each scan's original grid, as `evaluate.json` scores; candidates trained at once share the "
             "device (column 'parallel'), so their times are not those of a run alone. The ranking selects on the "
             "validation split: a winner's figure is confirmed with new seeds before it is reported as a result.", ""]
    searches: dict[tuple, list[dict]] = {}
    for row in history:
        searches.setdefault((row["date"], row["device"], row["command"]), []).append(row)
    for (date, device, command), found in reversed(list(searches.items())):
        found.sort(key=lambda r: -float(r["dice_mean"]) if r["dice_mean"] else math.inf)
        lines += [f"## {date}, {device}", "", f"`{command}` ({found[0]['budget_min']} min of training per candidate, "
                  f"{found[0]['parallel']} at once)", "",
                  "| candidate | bundle | seed | training s | epochs | Dice mean | Dice anterior | Dice posterior | "
                  "HD95 mean (mm) | status | what |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in found:
            lines.append("| " + " | ".join([r["candidate"], r["bundle"], r["seed"], r["train_s"] or "–",
                                            r["epochs"] or "–", r["dice_mean"] or "–", r["dice_anterior"] or "–",
                                            r["dice_posterior"] or "–", r["hd95_mean_mm"] or "–", r["status"],
                                            r["about"]]) + " |")
        lines.append("")
    (out / "recipe_search.md").write_text("\n".join(lines), encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--candidates", default=str(CANDIDATES), help="the candidates' JSON file")
    parser.add_argument("--group", default=None, help="the group of candidates to train ('first'; --quick: 'quick')")
    parser.add_argument("--only", default=None, help="comma-separated training candidates instead of a group")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock training budget of each candidate (5; --quick: 0.5)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="trainings at once (default: all of them on a GPU, one on a CPU)")
    parser.add_argument("--max_minutes", type=float, default=10.0, help="the whole search's wall-clock limit")
    parser.add_argument("--overhead_s", type=float, default=150.0,
                        help="what each training adds to its budget (start-up, caching, scoring), for the plan")
    parser.add_argument("--dataset_dir", default=None, help="MSD folder (default: each bundle's default task)")
    parser.add_argument("--work_dir", default=None, help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmark"),
                        help="folder of recipe_search.csv (appended to) and recipe_search.md")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny budgets, 10 cases, 2 iterations/epoch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.minutes is None:
        args.minutes = 0.5 if args.quick else 5.0
    if args.work_dir is None and not args.child:
        import tempfile

        args.work_dir = tempfile.mkdtemp(prefix="recipe_search_")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    spec = load_candidates(Path(args.candidates))
    by_name = {c["name"]: c for c in spec["training"] + spec.get("derived", [])}
    if args.child:
        rows = train_and_score(by_name[args.child], args.seed, args)
        out = Path(args.work_dir) / args.child / f"seed{args.seed}" / "result.json"
        out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        return
    names = args.only.split(",") if args.only else spec["groups"][args.group or ("quick" if args.quick else "first")]
    unknown = [n for n in names if n not in {c["name"] for c in spec["training"]}]
    if unknown:
        sys.exit(f"unknown training candidates {unknown}; see {args.candidates}")
    chosen = [by_name[n] for n in names]
    trainings = sum(1 if args.quick else len(c["seeds"]) for c in chosen)
    if args.parallel is None:
        args.parallel = trainings if args.device.startswith("cuda") else 1
    rounds = math.ceil(trainings / args.parallel)
    planned = rounds * (args.minutes * 60 + args.overhead_s) + DERIVED_S
    if planned > args.max_minutes * 60:
        sys.exit(f"{trainings} trainings, {args.parallel} at once, of {args.minutes:g} min each (+{args.overhead_s:.0f} s)"
                 f" need about {planned / 60:.1f} min, over --max_minutes {args.max_minutes:g}: train fewer (--only), "
                 "more at once (--parallel) or shorter (--minutes)")
    device = _device_name(args.device)
    print(f"{trainings} trainings on {device}, {args.parallel} at once, {args.minutes:g} min each; work in "
          f"{args.work_dir}", flush=True)
    rows = run_search(args, spec, chosen)
    write_outputs(rows, by_name, args, device, "python -m benchmarks.recipe_search " + " ".join(argv))
    print(f"wrote {Path(args.out) / 'recipe_search.csv'} and {Path(args.out) / 'recipe_search.md'}", flush=True)


if __name__ == "__main__":
    main()
