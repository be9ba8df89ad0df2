"""docs/RESULTS.md sections for the SKDCGN paper's experiments (experiments.paper), rendered from
benchmarks/results/paper_*.json (plus the invariance results they reuse).

Sections, each between its own `<!-- results:NAME -->` markers: paper-claims (near the top of the page, before
the generated summary), paper-table1, paper-transparency, paper-original-plus-cf and paper-baseline (a chapter of
their own, before the speed chapter). Each states which runs exist and which are missing.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from core.atomic import write_text_atomic
from experiments.paper import COLUMN_TITLES, COLUMNS, CF_ONLY, ORIGINAL_PLUS_CF, PAPER_TABLE1
from reporting import report

FAMILIES = ("double_colored_mnist", "wildlife_mnist")
SPOKEN = {"double_colored_mnist": "double-coloured", "wildlife_mnist": "wildlife"}
# CGN Table 2, train / test %.
CGN_TABLE2 = {
    "double_colored_mnist": {"original": (100.0, 10.3), ORIGINAL_PLUS_CF: (97.4, 89.0)},
    "wildlife_mnist": {"original": (100.0, 10.1), ORIGINAL_PLUS_CF: (99.2, 85.7)},
}
REPRODUCTION_CF_ONLY = {"double_colored_mnist": 86.5, "wildlife_mnist": 81.4}
SECTIONS = ("paper-claims", "paper-table1", "paper-transparency", "paper-original-plus-cf", "paper-baseline")
CHAPTER = "## The SKDCGN paper's experiments"
FAITHFUL_GAP = 2.0  # points: students "as good as" the teacher on the invariant classifier
ARMS = ("teacher", "student", "baseline")


# --- helpers --------------------------------------------------------------------------------------------------

def load(results_dir, name: str) -> dict | None:
    path = Path(results_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def acc(entry: dict | None, key: str = "test_accuracy", digits: int = 1) -> str:
    """'81.7' for one run, '81.8 ± 0.3' for several, '–' when missing."""
    if not entry:
        return "–"
    summary = entry[key]
    return f"{summary['mean']:.{digits}f}" if len(entry["runs"]) == 1 else report.pm(summary, digits)


def mean(entry: dict | None, key: str = "test_accuracy") -> float | None:
    return entry[key]["mean"] if entry else None


def arm_title(arm: str, sources: dict) -> str:
    name = sources.get(arm, "")
    if arm == "student":
        return f"students {name.rsplit('/', 1)[-1]} (ONNX)" if "/" in name else "students"
    if arm == "baseline":
        return "baseline (no distillation)"
    return arm


def reused_note(blocks: list[dict]) -> str:
    files = sorted({run["reused_from"] for block in blocks if block for entry in block.get("arms", {}).values()
                    for run in entry["runs"] if run.get("reused_from")})
    return ("Runs with an identical protocol were reused, not retrained: copied into this experiment's JSON from the "
            "runs then in " + ", ".join(f"`{f}`" for f in files)
            + " (later runs rewrite those files; the copies here are the record).") if files else ""


def seeds_of(entry: dict | None) -> str:
    return ",".join(str(r["seed"]) for r in entry["runs"]) if entry else ""


def describe_config(config: dict) -> str:
    train = config["train"]
    return (f"{config['images']:,} counterfactuals ({config['per_shape']} per mask), {train['epochs']} epochs, "
            f"seeds {','.join(map(str, config['seeds']))}")


def versions_line(sources) -> str:
    """`sources`: {arm: generator name}, or (arm, name) pairs gathered from several results."""
    pairs = sorted(set(sources.items() if isinstance(sources, dict) else sources))
    return "Generators: " + ", ".join(f"{arm} `{name}`" for arm, name in pairs) + "." if pairs else ""


# --- Table 1 ------------------------------------------------------------------------------------------------------

def table1_markdown(doc: dict | None) -> str:
    lines = ["### Table 1 reproduced: the shape-mechanism study (double-coloured MNIST)", ""]
    if not doc:
        return "\n".join(lines + ["Not run yet: `python -m experiments table1 --family double_colored_mnist "
                                  "--seeds 0`."])
    columns = doc["columns"]
    names = list(COLUMNS)
    sources = {}
    for column in columns.values():
        for part in ("detector", "digit"):
            sources.update(column.get(part, {}).get("sources", {}))
    header = ["measure", "generator", *(COLUMN_TITLES[n] for n in names)]
    rows = [["paper (SKDCGN Table 1): train %", "modified CGN", "–", *(f"{PAPER_TABLE1[n]['train']:g}" for n in names[1:])],
            ["paper (SKDCGN Table 1): test %", "modified CGN", "–", *(f"{PAPER_TABLE1[n]['test']:g}" for n in names[1:])]]
    for part, title in (("detector", "real-vs-counterfactual detector"), ("digit", "digit classifier (invariance)")):
        for arm in ("teacher", "student"):
            for key, what in (("train_accuracy", "train %"), ("test_accuracy", "test %")):
                cells = [acc(columns.get(n, {}).get(part, {}).get("arms", {}).get(arm), key) for n in names]
                rows.append([f"{title}: {what}", arm_title(arm, sources), *cells])
    missing = [f"{part} {COLUMN_TITLES[n]} ({arm})" for n in names for part in ("detector", "digit") for arm in
               ("teacher", "student") if not columns.get(n, {}).get(part, {}).get("arms", {}).get(arm)]
    detector = next((c["detector"] for c in columns.values() if c.get("detector")), None)
    digit = next((c["digit"] for c in columns.values() if c.get("digit")), None)
    lines += [
        "The paper modifies the CGN's shape masks (unit Gaussian noise σ = 1, clipped to [0, 1]; a random rotation "
        "drawn uniformly in ±90°; transparency a = 0.75, i.e. m' = 0.75·m), trains \"a classifier to tell real images "
        "from counterfactual ones\" and gives neither the classifier nor the split. Its test accuracies (13.51 and "
        "14.96 %) lie far below the 50 % that a balanced real-vs-counterfactual detector scores by guessing, and look "
        "like 10-way digit accuracies (chance 10 %), so each column gets both readings, one modifier at a time:",
        "",
        "- **detector**: SmallCNN (CGN's ~67k-parameter classifier) with two outputs, real vs counterfactual, "
        "balanced (chance 50 %). Train: t10k[:5000] real digits with random colours (the test recipe: with the "
        "label's own colours the colour pairing alone would give real images away) + "
        + (f"{detector['config']['images_per_class']:,} counterfactuals (seed s, {detector['config']['per_shape']} "
           f"per mask); test: t10k[5000:] with random colours + as many counterfactuals of another seed. "
           f"{detector['config']['train']['epochs']} epochs, Adadelta lr 1, StepLR γ 0.7, batch 64."
           if detector else "(not run).")
        ,
        "- **digit**: the invariant-classifier experiment (CGN Table 2's protocol) on the modified counterfactuals: "
        + (f"{describe_config(digit['config'])}; test t10k[5000:] with random colours." if digit else "(not run)."),
        "",
        report.table(header, rows),
        "",
    ]
    lines += [table1_reading(columns)]
    notes = [reused_note([c.get(p) for c in columns.values() for p in ("detector", "digit")]), versions_line(sources)]
    if missing:
        notes.append("Missing (CPU budget, not run): " + "; ".join(missing) + ".")
    lines += ["", " ".join(n for n in notes if n)]
    if doc.get("grid"):
        lines += ["", f"Counterfactuals per column (rows: {', '.join(doc.get('grid_rows', []))}; shape label = column): "
                  f"![Table 1 counterfactuals]({doc['grid']})"]
    return "\n".join(lines)


def table1_reading(columns: dict) -> str:
    """What the numbers say against the paper's, from whatever has been measured."""
    def value(part, name, arm="teacher", key="test_accuracy"):
        return mean(columns.get(name, {}).get(part, {}).get("arms", {}).get(arm), key)

    parts = []
    detector = [v for n in COLUMNS for arm in ("teacher", "student") for v in (value("detector", n, arm),) if v is not None]
    if detector:
        parts.append(
            f"**Detector reading.** Real digits and counterfactuals are told apart at {min(detector):.1f}–"
            f"{max(detector):.1f} % on held-out images (chance 50 %), in every column including the unmodified masks, "
            "for teacher and students alike. Its train accuracies sit where the paper's train row does, but a "
            "detector cannot score 13–15 % on a balanced test: the paper's test row is not a detector's.")
    arms = [arm for arm in ("teacher", "student") if all(value("digit", n, arm) is not None for n in COLUMNS)]
    for arm in arms:
        d = {n: value("digit", n, arm) for n in COLUMNS}
        tr = {n: value("digit", n, arm, "train_accuracy") for n in COLUMNS}
        parts.append(
            f"**Digit reading, {arm}.** Test {d['noise']:.1f} / {d['rotation']:.1f} / {d['transparency']:.1f} % "
            f"(noise / rotation / transparency) against {d['unmodified']:.1f} % unmodified (paper 14.96 / 13.51 / "
            f"58.86); train {tr['noise']:.1f} / {tr['rotation']:.1f} / {tr['transparency']:.1f} % (paper 99.9 / 99.1 "
            "/ 94.7).")
    if arms:
        d = {n: value("digit", n, arms[0]) for n in COLUMNS}
        collapse = max(d["noise"], d["rotation"]) < 40
        parts.append(
            ("Noise and rotation collapse the classifier towards chance, as in the paper. " if collapse else
             "The paper's collapse to near chance under noise and rotation does not happen here: the digit's shape "
             "stays learnable under every modifier. ")
            + "Why the numbers differ: the paper states neither its classifier nor its split, and its pairs of ~99 % "
              "train with ~14 % test are the signature of a classifier that fits its training counterfactuals but "
              "learns nothing that transfers to its test images; which of its unstated choices causes that, we cannot "
              "tell. With CGN's small CNN and this split: σ = 1 noise (per pixel, clipped to [0, 1]) still leaves the "
              "digit region brighter on average than the background (clip(1 + n) against clip(n)), so the noisy "
              "training set is hard (low train accuracy) while the shape it teaches still transfers to clean test "
              "digits; a ±90° rotation trains on orientations the upright test digits never show, the one modifier "
              "that costs accuracy here; a = 0.75 only lets a quarter of the background through the digit.")
    return "\n\n".join(parts) if parts else "(No column measured yet.)"


# --- Transparency -------------------------------------------------------------------------------------------------

def transparency_rows(doc: dict) -> list[list[str]]:
    settings = doc["settings"]
    before, after = settings.get("unmodified", {}), settings.get("transparency", {})
    sources = {**before.get("sources", {}), **after.get("sources", {})}
    config = (after or before).get("config", {})
    rows = []
    for arm in ("teacher", "student"):
        b, a = before.get("arms", {}).get(arm), after.get("arms", {}).get(arm)
        change = f"{mean(a) - mean(b):+.1f}" if a and b else ""
        rows.append([f"{SPOKEN[doc['family']]}, {doc['scale']} scale ({config.get('images', 0) // 1000}k, "
                     f"{config.get('train', {}).get('epochs', '?')} epochs)", arm_title(arm, sources),
                     acc(b, "train_accuracy"), acc(b), acc(a, "train_accuracy"), acc(a), change,
                     f"{seeds_of(b)} / {seeds_of(a)}"])
    return rows


def transparency_markdown(docs: dict[str, dict | None]) -> str:
    lines = ["### Transparency (§4.4): the invariant classifier with a = 0.75", "",
             "SKDCGN §4.4: with the mask made \"smoother/transparent by using 3/4th of the mask\" the invariant "
             "classifier scored above the CGN paper's figure (no number given; CGN's double-coloured figure is 89.0 %, "
             "original + counterfactuals at paper scale). Here: m' = 0.75·m alone, everything else the "
             "invariant-classifier protocol (counterfactuals only, test t10k[5000:] with random colours), beside the "
             "unmodified masks; accuracy % as mean ± std (ddof 1) over seeds where several ran.", ""]
    rows, blocks, sources, missing = [], [], set(), []
    for key, doc in docs.items():
        if doc:
            rows += transparency_rows(doc)
            blocks += [doc["settings"].get(s) for s in ("unmodified", "transparency")]
            for s in doc["settings"].values():
                sources.update(s.get("sources", {}).items())
        else:
            missing.append(key)
    if rows:
        lines += [report.table(["family, scale", "generator", "unmodified train %", "unmodified test %",
                                "a = 0.75 train %", "a = 0.75 test %", "change (points)", "seeds"], rows), ""]
    notes = [reused_note(blocks), versions_line(sources)]
    if missing:
        notes.append("Not run (CPU budget): " + "; ".join(missing) + ".")
    lines.append(" ".join(n for n in notes if n))
    return "\n".join(lines)


# --- Original + counterfactuals ---------------------------------------------------------------------------------

def original_plus_cf_markdown(docs: dict[str, dict | None]) -> str:
    lines = ["### Original + counterfactuals (CGN Table 2's protocol) beside counterfactuals only", "",
             "CGN's Table 2 trains the invariant classifier on the real (biased) training set plus the "
             "counterfactuals. The real biased set here is the one the project already uses: MNIST t10k[:5000], "
             "each digit in its label's colours (double-coloured) or textures (wildlife), recipe "
             "`training.data.build_double_colored` / `build_wildlife` with style \"train\"; the test set is "
             "t10k[5000:] with random colours/textures. \"Original + counterfactuals\" concatenates those 5,000 real "
             "digits with the counterfactual set (CGN: 60,000 real digits beside 100,000 counterfactuals).", ""]
    rows, blocks, pairs, missing = [], [], set(), []
    for key, doc in docs.items():
        if not doc:
            missing.append(key)
            continue
        family, settings = doc["family"], doc["settings"]
        sources = {}
        config = (settings.get(ORIGINAL_PLUS_CF) or settings.get(CF_ONLY) or {}).get("config", {})
        scale = f"{SPOKEN[family]}, {doc['scale']} scale ({config.get('images', 0) // 1000}k, " \
                f"{config.get('train', {}).get('epochs', '?')} epochs)"
        paper = CGN_TABLE2[family]
        real = settings.get("real", {}).get("arms", {}).get("real")
        rows.append([scale, "real only (biased)", acc(real, "train_accuracy"), acc(real),
                     f"{paper['original'][0]:g} / {paper['original'][1]:g}", seeds_of(real)])
        for arm in ("teacher", "student"):
            for training_set in (CF_ONLY, ORIGINAL_PLUS_CF):
                block = settings.get(training_set, {})
                entry = block.get("arms", {}).get(arm)
                sources.update(block.get("sources", {}))
                pairs.update(block.get("sources", {}).items())
                published = (f"{paper[ORIGINAL_PLUS_CF][0]:g} / {paper[ORIGINAL_PLUS_CF][1]:g}"
                             if training_set == ORIGINAL_PLUS_CF and arm == "teacher" else
                             f"– / {REPRODUCTION_CF_ONLY[family]:g} (public reproduction)"
                             if arm == "teacher" else "")
                rows.append([scale, f"{arm_title(arm, sources)}: {training_set}", acc(entry, "train_accuracy"),
                             acc(entry), published, seeds_of(entry)])
                blocks.append(block)
    if rows:
        lines += [report.table(["family, scale", "training data", "train %", "test %", "paper train / test %", "seeds"],
                               rows), ""]
    notes = [reused_note(blocks), versions_line(pairs)]
    if missing:
        notes.append("Not run (CPU budget): " + "; ".join(missing) + ".")
    lines.append(" ".join(n for n in notes if n))
    return "\n".join(lines)


# --- Baseline -----------------------------------------------------------------------------------------------------

def baseline_markdown(doc: dict | None) -> str:
    lines = ["### Baseline without distillation (§4.2): TinyGAN generators trained as a CGN from scratch", ""]
    if not doc:
        return "\n".join(lines + ["Not run yet: `python -m experiments baseline --family double_colored_mnist`."])
    training, config = doc["training"], doc["training"]["config"]
    checks = doc.get("checks", {})
    sources = doc.get("sources", {})
    digit, detector = doc.get("digit", {}), doc.get("detector", {})
    steps = training["steps_done"]
    lines += [
        "SKDCGN §4.2 compares against \"CGN with generator replaced by TinyGAN generator\", trained with CGN's own "
        "procedure and no teacher. Ours (`experiments/baseline_cgn.py`): three `TinyGenerator`s with the distilled "
        f"students' architecture ({'-'.join(map(str, config['student']['channels']))} {config['student']['upsample']}), "
        "trained on real double-coloured digits with CGN's MNIST procedure: labels drawn uniformly, x = m·f + (1 − m)·b "
        "with the shuffler on texture and background, MSE adversarial loss against a class-conditional discriminator "
        f"(an MLP on [image, label embedding], {config['ndf']} wide, dropout 0.4, as CGN's linear MNIST "
        f"discriminator), binary-entropy mask loss (weight {config['binary_weight']:g}), a style (Gram) perceptual loss "
        f"to real images (weights {' / '.join(f'{w:g}' for w in config['style_weights'])}), Adam lr "
        f"{fmt_lr(config['lr'])}, betas ({config['betas'][0]:g}, {config['betas'][1]:g}), batch {config['batch_size']}, "
        f"orthogonal init (gain {config['init_gain']:g}).",
        "",
        "Substitutes, stated: real digits are MNIST **t10k[:5000]** in their label's colours (the biased training "
        "set the invariant-classifier experiment uses; t10k[5000:] stays its test set; CGN used the 60,000 "
        "training digits). CGN's perceptual loss uses an ImageNet VGG, not available offline: we use the project's "
        "digit CNN (SmallCNN trained on binarised real digits t10k[:5000], frozen) applied to each colour channel, "
        "Gram matrices of its conv blocks 2 and 3, their difference measured relative to the real Grams' energy "
        "(CGN's weights were set for VGG's scale).",
        "",
        f"Training: {steps:,} steps of batch {config['batch_size']} "
        f"({steps * config['batch_size'] / 60000:.1f} CGN-epochs of 60,000 digits; CGN trains 5), "
        f"{training['seconds'] / 60:.0f} min on this CPU" + ("" if training.get("finished") else
                                                          f" (stopped by the time cap before {config['steps']:,})")
        + ". " + losses_text(training.get("history", [])),
        "",
    ]
    header = ["generator", "masks read as their label (digit CNN) %", "mask area (mean value)",
              "mask pixels neither <0.1 nor >0.9 %",
              "textures wear their label %", "backgrounds wear their label %", "invariant classifier test %",
              "detector test % (50 = indistinguishable)"]
    rows = []
    for arm in ARMS:
        c = checks.get(arm)
        if not c:
            continue
        rows.append([arm_title(arm, sources), f"{c['mask_recognised']:.1f}", f"{c['mask_mean']:.3f}",
                     f"{c['mask_undecided']:.1f}",
                     f"{c['texture_wears_label']:.1f}", f"{c['background_wears_label']:.1f}",
                     acc(digit.get("arms", {}).get(arm)), acc(detector.get("arms", {}).get(arm))])
    if rows:
        recogniser = checks.get("recogniser", {})
        lines += [report.table(header, rows), "",
                  f"Checks on {checks.get('pairs', 0):,} held-out (z, y) draws (seed {checks.get('heldout_seed')}), the "
                  f"same for all three; the digit CNN reads {recogniser.get('accuracy_on_t10k[5000:]', float('nan')):.1f} % "
                  "of real t10k[5000:] digits right. Label checks: nearest palette colour. Invariant classifier: "
                  + (describe_config(digit["config"]) if digit.get("config") else "not run")
                  + ", counterfactuals only; detector: the Table 1 protocol, unmodified masks."]
        lines += ["", baseline_reading(checks, digit)]
    notes = [reused_note([digit, detector]), versions_line(sources)]
    lines += ["", " ".join(n for n in notes if n)]
    if doc.get("grid"):
        lines += ["", f"Rows: {', '.join(doc.get('grid_rows', []))}; shape label = column, textures and backgrounds "
                  f"of independent labels, identical draws: ![baseline vs distilled vs teacher]({doc['grid']})"]
    return "\n".join(lines)


def fmt_lr(lr: float) -> str:
    """2e-4 rather than 0.0002."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{lr:g}" if lr >= 1e-3 else f"{float(mantissa):g}e{int(exponent)}"


def losses_text(history: list[dict]) -> str:
    if not history:
        return ""
    first, last = history[0], history[-1]
    keys = [k for k in ("adv", "binary", "perc", "d") if k in last]
    return ("Losses (mean over logging windows), first → last: "
            + ", ".join(f"{k} {first[k]:.3f} → {last[k]:.3f}" for k in keys) + ".")


def baseline_reading(checks: dict, digit: dict) -> str:
    student, baseline = checks.get("student"), checks.get("baseline")
    if not student or not baseline:
        return ""
    s_inv, b_inv = mean(digit.get("arms", {}).get("student")), mean(digit.get("arms", {}).get("baseline"))
    teacher = checks.get("teacher", {})
    text = (f"Distillation's contribution: the distilled students' masks are read as their label "
            f"{student['mask_recognised']:.1f} % of the time, the baseline's {baseline['mask_recognised']:.1f} %")
    if s_inv is not None and b_inv is not None:
        text += (f"; an invariant classifier trained on their counterfactuals scores {s_inv:.1f} % vs {b_inv:.1f} % on "
                 "real randomly coloured digits")
    text += "."
    if teacher and baseline["mask_mean"] > 1.5 * teacher["mask_mean"]:
        text += (f" The baseline's masks cover {baseline['mask_mean']:.0%} of the image on average (teacher "
                 f"{teacher['mask_mean']:.0%}): for some labels the shape mechanism has taken the background and the "
                 "texture mechanism paints it (inverted masks in the grid below), so the composite still looks like "
                 "a digit while shape, texture and background are not disentangled, and the texture and background "
                 f"labels hold only {baseline['texture_wears_label']:.0f} / {baseline['background_wears_label']:.0f} % "
                 "of the time. One run of one seed, on 5,000 real digits and with a substitute perceptual net; "
                 "CGN's own training "
                 "(60,000 digits, VGG features) may disentangle better.")
    return text


# --- Claims -------------------------------------------------------------------------------------------------------

def claims_markdown(results_dir) -> str:
    table1 = load(results_dir, "paper_table1_double_colored_mnist")
    transparency = {f: load(results_dir, f"paper_transparency_{f}") for f in FAMILIES}
    transparency_paper = load(results_dir, "paper_transparency_double_colored_mnist_paper_scale")
    opc = {f: load(results_dir, f"paper_original_plus_cf_{f}") for f in FAMILIES}
    opc_paper = load(results_dir, "paper_original_plus_cf_double_colored_mnist_paper_scale")
    baseline = load(results_dir, "paper_baseline_double_colored_mnist")
    opc_paper_wildlife = load(results_dir, "paper_original_plus_cf_wildlife_mnist_paper_scale")
    rows = [claim_table1(table1) + [students_of(table1)],
            claim_transparency(transparency, transparency_paper)
            + [students_of(*transparency.values(), transparency_paper)],
            claim_students(transparency) + [students_of(*transparency.values())],
            claim_original_plus_cf(opc, {"double_colored_mnist": opc_paper, "wildlife_mnist": opc_paper_wildlife})
            + [students_of(*opc.values(), opc_paper, opc_paper_wildlife)],
            claim_baseline(baseline) + [students_of(baseline)]]
    rows = [[claim, measured, students, verdict] for claim, measured, verdict, students in rows]
    return "\n".join([
        "### Paper claims",
        "",
        "Each claim of the SKDCGN paper (and the CGN figures it builds on), what this project measured, and whether "
        "it holds here. Details and protocols in the sections of [the SKDCGN paper's experiments]"
        "(#the-skdcgn-papers-experiments); \"not run\" means the CPU budget did not reach it. Each row names the "
        "student versions it measured (the teacher is always the official CGN of the family); a verdict holds for "
        "those versions only.",
        "",
        report.table(["claim (paper)", "measured here", "students measured", "holds?"], rows),
    ])


def _digit(doc, column, arm="teacher"):
    return mean(((doc or {}).get("columns", {}).get(column, {}).get("digit", {}).get("arms", {})).get(arm))


def claim_table1(doc: dict | None) -> list[str]:
    claim = ("Table 1: noise / rotation / transparency on the masks give train 99.9 / 99.1 / 94.7 %, test 14.96 / "
             "13.51 / 58.86 %")
    if not doc:
        return [claim, "not run", "not run"]
    cols = doc["columns"]
    det = {n: mean(cols.get(n, {}).get("detector", {}).get("arms", {}).get("teacher")) for n in COLUMNS}
    digit = {n: _digit(doc, n) for n in COLUMNS}
    student = {n: _digit(doc, n, "student") for n in COLUMNS}
    parts = []
    if all(v is not None for v in det.values()):
        parts.append("detector (teacher) test " + " / ".join(f"{det[n]:.1f}" for n in list(COLUMNS)[1:])
                     + f" % (unmodified {det['unmodified']:.1f})")
    if all(v is not None for v in digit.values()):
        parts.append("digit classifier test, teacher " + " / ".join(f"{digit[n]:.1f}" for n in list(COLUMNS)[1:])
                     + (", students " + " / ".join(f"{student[n]:.1f}" for n in list(COLUMNS)[1:])
                        if all(v is not None for v in student.values()) else "")
                     + f" % (unmodified {digit['unmodified']:.1f})")
    if not parts:
        return [claim, "not run", "not run"]
    verdict = []
    if all(v is not None for v in det.values()):
        verdict.append("detector reading: **no** (far above chance in every column)")
    if all(v is not None for v in digit.values()):
        collapse = max(digit["noise"], digit["rotation"]) < 40
        verdict.append("digit reading: " + ("partly: noise and rotation collapse" if collapse else
                                            "**no**: noise and rotation do not collapse the classifier"))
    return [claim, "; ".join(parts), "; ".join(verdict)]


def claim_transparency(docs: dict, paper_doc: dict | None) -> list[str]:
    claim = "§4.4: transparent masks (a = 0.75) lift the invariant classifier above CGN's figure"
    measured, changes = [], []
    for label, family_docs in (("default scale", docs), ("paper scale", {"double_colored_mnist": paper_doc})):
        parts = []
        for family, doc in family_docs.items():
            if not doc:
                continue
            s = doc["settings"]
            for arm in ("teacher", "student"):
                b = mean(s.get("unmodified", {}).get("arms", {}).get(arm))
                a = mean(s.get("transparency", {}).get("arms", {}).get(arm))
                if a is not None and b is not None:
                    changes.append(a - b)
                    parts.append(f"{SPOKEN[family]} {arm} {a:.1f} vs {b:.1f}")
        if parts:
            measured.append(f"{label}: " + ", ".join(parts))
    if not changes:
        return [claim, "not run", "not run"]
    largest = max(abs(c) for c in changes)
    verdict = ("yes: above the unmodified masks by more than 2 points" if min(changes) > 2 else
               "**no**: below the unmodified masks by more than 2 points" if max(changes) < -2 else
               f"**no**: within {largest:.1f} points of the unmodified masks (seed noise)" if largest <= 2 else "mixed")
    teacher = mean((paper_doc or {}).get("settings", {}).get("transparency", {}).get("arms", {}).get("teacher"))
    if teacher is not None:
        verdict += (f"; above CGN's 89.0 (double-coloured, paper scale): {'yes' if teacher > 89.0 else '**no**'} "
                    f"(teacher {teacher:.1f}, counterfactuals only)")
    else:
        verdict += "; paper scale not run"
    return [claim, "; ".join(measured) + " % test, a = 0.75 vs unmodified masks", verdict]


def claim_students(docs: dict) -> list[str]:
    claim = "SKDCGN: distilled TinyGAN students stand in for the CGN (invariant classifier as good as the teacher's)"
    parts, gaps = [], []
    for family, doc in docs.items():
        if not doc:
            continue
        for setting in ("unmodified", "transparency"):
            arms = doc["settings"].get(setting, {}).get("arms", {})
            t, s = mean(arms.get("teacher")), mean(arms.get("student"))
            if t is not None and s is not None:
                gaps.append(t - s)
                parts.append(f"{SPOKEN[family]} {setting}: students {s:.1f} vs teacher {t:.1f}")
    if not gaps:
        return [claim, "not run", "not run"]
    return [claim, "; ".join(parts) + " % test",
            f"yes: within {max(gaps):.1f} points" if max(gaps) <= FAITHFUL_GAP else
            f"**no**: up to {max(gaps):.1f} points below"]


def claim_original_plus_cf(docs: dict, paper_docs: dict) -> list[str]:
    """`docs`, `paper_docs`: {family: result} at default and at paper scale. The verdict is per family, from a
    paper-scale run only (CGN's figures are at paper scale)."""
    claim = "CGN Table 2: original + counterfactuals reach 89.0 % (double-coloured) / 85.7 % (wildlife)"
    parts = []
    labelled = [*((f"{SPOKEN[f]} default scale", d) for f, d in docs.items()),
                *((f"{SPOKEN[f]} paper scale", d) for f, d in paper_docs.items())]
    for label, doc in labelled:
        if not doc:
            continue
        arms = doc["settings"].get(ORIGINAL_PLUS_CF, {}).get("arms", {})
        t, s = mean(arms.get("teacher")), mean(arms.get("student"))
        if t is not None:
            parts.append(f"{label}: teacher {t:.1f}" + (f", students {s:.1f}" if s is not None else ""))
    if not parts:
        return [claim, "not run", "not run"]
    verdicts = []
    for family in FAMILIES:
        published = CGN_TABLE2[family][ORIGINAL_PLUS_CF][1]
        paper_t = mean((paper_docs.get(family) or {}).get("settings", {}).get(ORIGINAL_PLUS_CF, {}).get("arms", {})
                       .get("teacher"))
        default_t = mean((docs.get(family) or {}).get("settings", {}).get(ORIGINAL_PLUS_CF, {}).get("arms", {})
                         .get("teacher"))
        if paper_t is not None:
            verdict = (f"yes (within 2 points of {published:g} at paper scale)" if abs(paper_t - published) <= 2 else
                       f"**no**: {paper_t - published:+.1f} points at paper scale")
        else:
            verdict = "not run at paper scale" + (f" ({default_t:.1f} vs {published:g} at default scale)"
                                                  if default_t is not None else "")
        verdicts.append(f"{SPOKEN[family]}: {verdict}")
    return [claim, "; ".join(parts) + " % test (5,000 real digits, not 60,000)", "; ".join(verdicts)]


def claim_baseline(doc: dict | None) -> list[str]:
    claim = "§4.2: distillation beats the same TinyGAN generators trained as a CGN from scratch"
    if not doc or "checks" not in doc:
        return [claim, "not run", "not run"]
    checks, digit = doc["checks"], doc.get("digit", {}).get("arms", {})
    s, b = checks.get("student", {}), checks.get("baseline", {})
    si, bi = mean(digit.get("student")), mean(digit.get("baseline"))
    parts = [f"masks read as their label: students {s.get('mask_recognised', float('nan')):.1f} %, baseline "
             f"{b.get('mask_recognised', float('nan')):.1f} %"]
    if si is not None and bi is not None:
        parts.append(f"invariant classifier: {si:.1f} vs {bi:.1f} %")
    steps = doc["training"]["steps_done"]
    better = s.get("mask_recognised", 0) > b.get("mask_recognised", 0) + 2 and (si is None or bi is None or si > bi + 2)
    return [claim, "; ".join(parts) + f" (baseline: {steps:,} steps, {doc['training']['seconds'] / 60:.0f} min CPU)",
            ("yes" if better else "**no**") + " at this training length"]


# --- the page -------------------------------------------------------------------------------------------------------

def render_all(results_dir, results_md) -> dict[str, str]:
    """Every paper section rendered from the JSON in `results_dir` and written into `results_md`."""
    bodies = section_bodies(results_dir)
    place_sections(results_md)
    for name, body in bodies.items():
        report.update_section(results_md, name, body)
    return bodies


def section_bodies(results_dir) -> dict[str, str]:
    """Every paper section as the JSON in `results_dir` renders it (reads only; `generated check` compares)."""
    return {
        "paper-claims": claims_markdown(results_dir),
        "paper-table1": table1_markdown(load(results_dir, "paper_table1_double_colored_mnist")),
        "paper-transparency": transparency_markdown({
            "double-coloured, default scale": load(results_dir, "paper_transparency_double_colored_mnist"),
            "wildlife, default scale": load(results_dir, "paper_transparency_wildlife_mnist"),
            "double-coloured, paper scale": load(results_dir, "paper_transparency_double_colored_mnist_paper_scale"),
        }),
        "paper-original-plus-cf": original_plus_cf_markdown({
            "double-coloured, default scale": load(results_dir, "paper_original_plus_cf_double_colored_mnist"),
            "double-coloured, paper scale": load(results_dir, "paper_original_plus_cf_double_colored_mnist_paper_scale"),
            "wildlife, default scale": load(results_dir, "paper_original_plus_cf_wildlife_mnist"),
        }),
        "paper-baseline": baseline_markdown(load(results_dir, "paper_baseline_double_colored_mnist")),
    }


def students_of(*docs: dict | None) -> str:
    """The student versions behind results (`double_colored_mnist/v2`), from their `sources`; '–' when none."""
    names = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "sources" and isinstance(value, dict):
                    names.update(v.split(":", 1)[1] for v in value.values()
                                 if isinstance(v, str) and v.startswith("student:"))
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    for doc in docs:
        walk(doc)
    return ", ".join(f"`{name}`" for name in sorted(names)) or "–"


def place_sections(results_md: str | os.PathLike) -> None:
    """Put missing markers where they belong: claims before the generated summary (else after the page's
    introduction), the rest as a chapter before the speed chapter (else at the end)."""
    path = Path(results_md)
    text = path.read_text() if path.is_file() else report.RESULTS_HEADER
    def block(name: str) -> str:
        return f"<!-- results:{name} -->\n<!-- /results:{name} -->\n"
    if "<!-- results:paper-claims -->" not in text:
        anchor = text.find("<!-- generated:summary -->")
        if anchor < 0:
            first = re.search(r"\n## ", text)
            anchor = first.start() + 1 if first else len(text)
        text = text[:anchor] + block("paper-claims") + "\n" + text[anchor:]
    rest = [n for n in SECTIONS[1:] if f"<!-- results:{n} -->" not in text]
    if rest:
        chapter = ("" if CHAPTER in text else CHAPTER + "\n\n") + "\n".join(block(n) for n in rest)
        existing = [text.find(f"<!-- /results:{n} -->") for n in SECTIONS[1:] if f"<!-- /results:{n} -->" in text]
        if existing:
            end = text.find("\n", max(existing)) + 1
            text = text[:end] + "\n" + chapter + text[end:]
        else:
            anchor = text.find("## Speed: teacher vs students")
            text = (text[:anchor] + chapter + "\n" + text[anchor:]) if anchor >= 0 else text.rstrip() + "\n\n" + chapter
    write_text_atomic(path, text)
