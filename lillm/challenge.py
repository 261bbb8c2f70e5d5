"""The Buzuzu-Mavi challenge, in one place: its tasks, prompts, labels, score and submission file.

The challenge (Zindi, with Lelapa AI) asks for a small model that does three tasks in Swahili and
Hausa; lillm adds a fourth for training. Everything lillm knows about it lives here, the way
nanochat keeps one file per task; the drivers (data/prepare_sft.py, data/prepare_dpo.py,
scripts/evaluate.py) only choose and write.

Tasks, with the answers in the challenge's words (see SOURCES.md, "Buzuzu-Mavi challenge format"):
- translation: English -> Swahili and English -> Hausa, MAFAND-MT (train/dev/test as released).
- sentiment: AfriSenti tweets; Swahili Chanya / Wastani / Hasi, Hausa Kyakkyawa / Tsaka-tsaki / Korau.
- nli: the machine-translated AfriXNLI files; answers 0 / 1 / 2 = entailment / neutral / contradiction.
  The premise and hypothesis files are joined to the English file's gold labels on pairID (Swahili)
  or on promptID + English hypothesis (Hausa, which has no pairID column). The source has only dev
  and test: its test is our test split; its dev is cut by premise (a seeded hash of the promptID,
  NLI_DEV_SHARE of the premises with all their hypotheses) into our dev split and our train split,
  so a model can be chosen on NLI without seeing the test.
- news (not scored by the challenge): MasakhaNEWS topics, answered with the dataset's own
  (English) category names; the hau/swa train split is the public 50-articles-per-label file.
One label table, LABELS, holds each classification task's answer words in class order: position i
is class i of the challenge's F1 and the order the options are offered in.

Prompts: each task has several phrasings in the task's language and in English; one is chosen per
row by a seeded hash of the row's identity (seeded_choice), so re-runs give the same files and
adding a source does not change other rows. The same hash picks the wrong label of a preference
pair.

The challenge's own scoring (the Buzuzu-Mavi starter's utils/eval.py, reimplemented and tested by
hand in tests/test_challenge_metric.py), which is what the leaderboard numbers mean:
- sentiment: macro F1 over classes 0, 1, 2 with Swahili and Hausa rows pooled; each language's
  words map to a class by position (Chanya / Kyakkyawa = 0, Wastani / Tsaka-tsaki = 1,
  Hasi / Korau = 2); the prediction is the option with the highest log-likelihood.
- XNLI: macro F1 over labels 0, 1, 2, both languages pooled.
- MT: a chrF per sentence, averaged over sentences, on 0..1: spaces (only ' ') removed, character
  n-grams n = 1..6, clipped matches; precision = matches / hypothesis n-grams and recall =
  matches / reference n-grams, where a side with no n-gram of that order counts as 1 (so an order
  a short string cannot fill scores 0 and still counts in the average over the six orders);
  F-beta with beta 2 on the averaged precision and recall, 0 when both are 0. Unlike sacrebleu's
  corpus chrF (lillm/metrics.py), a 3-character exact answer scores 0.5, not 1.
- the score (the headline): the organisers' scorer (zindi_scorer.py's `evaluate_zindi`) puts every
  per-sentence chrF and the two F1s into one list and averages it, so MT weighs by its number of
  sentences: with 300 MT rows, the two F1s are 2 of 302 numbers. zindi = (score + (1 - params /
  421,939,200) * score) / 2, where 421,939,200 is InkubaLM-0.4B's size: half the score rewards
  being small. This is the number a submission is ranked by.
- the mean of the three components (sentiment F1, XNLI F1, mean chrF), as the public write-ups
  describe the score, is reported beside it under that name, with its own zindi.
lillm's own summary beside it, `challenge_average`, is the mean over the six (task, language)
subsets of weighted F1 and corpus chrF / 100.

The challenge's submission file (`ID`, `Response`, `Targets`) is written and read back here too:
classification rows carry the three scores the choice is the argmax of, MT rows the translation,
and one `size` row the parameter count; `score_submission` scores such a file exactly as the
organisers' scorer does, also in the organisers' own layout (a leading unnamed index column,
a lower-case `targets`, `tensor([[...]], device='cuda:0', dtype=torch.float16)` scores and a
`Model size` row).

Pairs for preference tuning (lillm/dpo.py) come from the same tasks: the gold label against a
wrong one, and the reference translation against the model's own worse sample.
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from .config import INKUBA_PARAMS
from .corpora import CORPORA
from .errors import InputFileError, SFTSourceError, SubmissionError
from .evaluate import SCORINGS, evaluate_subset
from .generate import generate
from .metrics import chrf, macro_f1
from .rows import by_task_and_lang, evenly_spaced, need_columns, prompt_and_answer, read_csv_rows, render_user, undecodable
from .sft import prompt_ids
from .tokenizer import Tokenizer

# ---- tasks and labels -------------------------------------------------------------------------------
TASKS = ("translation", "sentiment", "nli", "news")
LANGS = ("swa", "hau")
SPLITS = ("train", "dev", "test")
LANG_NAMES = {"swa": "Swahili", "hau": "Hausa"}
NEWS_TOPICS = ("business", "entertainment", "health", "politics", "religion", "sports", "technology")
LABELS = {("sentiment", "swa"): ("Chanya", "Wastani", "Hasi"),
          ("sentiment", "hau"): ("Kyakkyawa", "Tsaka-tsaki", "Korau"),
          ("nli", "swa"): ("0", "1", "2"), ("nli", "hau"): ("0", "1", "2"),
          ("news", "swa"): NEWS_TOPICS, ("news", "hau"): NEWS_TOPICS}
# The sources' own names of the classes, in the same order: AfriSenti's labels, XNLI's gold labels.
SOURCE_CLASSES = {"sentiment": ("positive", "neutral", "negative"),
                  "nli": ("entailment", "neutral", "contradiction")}
HINT = "see docs/DATA.md, or leave its task out with --tasks"
XNLI_DIR = "afrixnli_mt_joynaomi81"
XNLI_SPLIT = {"train": "dev", "dev": "dev", "test": "test"}  # our split -> the source's file
NLI_DEV_SHARE = 10  # one premise in 10 of the source's dev goes to our dev split
XNLI_FILES = {  # (english, sentence1, sentence2) per source split and language; names contain spaces
    ("dev", "swa"): ("dev/xnli.dev - eng_dataset.csv", "dev/swahili/sentence1_translations.csv",
                     "dev/swahili/sentence2_translations.csv"),
    ("dev", "hau"): ("dev/xnli.dev - eng_dataset.csv", "dev/hausa/sentence1_translated.csv",
                     "dev/hausa/sentence2_translated.csv"),
    ("test", "swa"): ("test/xnli.test - english.csv", "test/swahili/sentence1_translations.csv",
                      "test/swahili/sentence2_translations.csv"),
    ("test", "hau"): ("test/xnli.test - english.csv", "test/hausa/sentence1_translated.csv",
                      "test/hausa/sentence2_translated.csv"),
}


def task_options(task: str, lang: str) -> list[str] | None:
    """The answers a classification task offers, in class order; None for translation."""
    return list(LABELS[(task, lang)]) if (task, lang) in LABELS else None


def class_index(task: str, lang: str, label: str | None) -> int:
    """The challenge's class of a label word (-1 for None: an answer off the list)."""
    return -1 if label is None else LABELS[(task, lang)].index(label)


def seeded_choice(seed: int, key: str, count: int) -> int:
    """A deterministic index in [0, count) from the seed and a row's identity."""
    digest = hashlib.blake2b(f"{seed}|{key}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % count


# ---- prompts ---------------------------------------------------------------------------------------
# Phrasings per (task, language); {lang}, {a} {b} {c} (sentiment words) and {options} are filled in.
INSTRUCTIONS = {
    ("translation", "swa"): ["Tafsiri sentensi ifuatayo kutoka Kiingereza kwenda Kiswahili.",
                             "Tafsiri maandishi haya ya Kiingereza kwa Kiswahili.",
                             "Andika tafsiri ya Kiswahili ya sentensi hii ya Kiingereza."],
    ("translation", "hau"): ["Fassara wannan jumla daga Turanci zuwa Hausa.",
                             "Fassara rubutun Turanci mai zuwa zuwa harshen Hausa.",
                             "Rubuta fassarar Hausa ta wannan jumlar Turanci."],
    ("translation", "en"): ["Translate the following sentence from English to {lang}.",
                            "Translate this English text into {lang}.",
                            "Give the {lang} translation of this English sentence."],
    ("sentiment", "swa"): ["Tambua hisia ya tweet hii. Jibu kwa neno moja: {a}, {b} au {c}.",
                           "Je, ujumbe huu una hisia gani? Chagua {a}, {b} au {c}.",
                           "Ainisha hisia ya maandishi yafuatayo kama {a}, {b} au {c}."],
    ("sentiment", "hau"): ["Gano ra'ayin wannan tweet. Amsa da kalma ɗaya: {a}, {b} ko {c}.",
                           "Wane irin ra'ayi ne wannan sakon yake nunawa? Zaɓi {a}, {b} ko {c}.",
                           "Rarraba ra'ayin rubutun da ke ƙasa a matsayin {a}, {b} ko {c}."],
    ("sentiment", "en"): ["What is the sentiment of this tweet? Answer with one word: {a} (positive), "
                          "{b} (neutral) or {c} (negative).",
                          "Classify the sentiment of the following text as {a}, {b} or {c}.",
                          "Is this message positive ({a}), neutral ({b}) or negative ({c})?"],
    ("nli", "swa"): ["Soma msingi na dhana. Jibu 0 ikiwa msingi unathibitisha dhana, 1 ikiwa haijulikani, "
                     "au 2 ikiwa unaipinga.",
                     "Je, dhana inafuata kutoka kwa msingi? Jibu kwa 0 (ndiyo), 1 (haijulikani) au 2 (inapingana)."],
    ("nli", "hau"): ["Karanta jumla ta farko da ta biyu. Amsa 0 idan ta farko ta tabbatar da ta biyu, "
                     "1 idan ba a sani ba, ko 2 idan sun saɓa.",
                     "Shin jumla ta biyu gaskiya ce bisa ga jumla ta farko? Amsa da 0 (eh), 1 (ba a sani ba) "
                     "ko 2 (sun saɓa)."],
    ("nli", "en"): ["Does the premise entail the hypothesis? Answer 0 for entailment, 1 for neutral or "
                    "2 for contradiction.",
                    "Read the premise and the hypothesis. Reply 0 if the premise implies the hypothesis, "
                    "1 if it neither implies nor contradicts it, 2 if it contradicts it."],
    ("news", "swa"): ["Makala hii ya habari inahusu mada gani? Chagua moja: {options}.",
                      "Ainisha habari ifuatayo katika mojawapo ya mada hizi: {options}."],
    ("news", "hau"): ["Wane fanni ne wannan labari ya shafa? Zaɓi ɗaya: {options}.",
                      "Rarraba labarin da ke ƙasa zuwa ɗaya daga cikin waɗannan fannoni: {options}."],
    ("news", "en"): ["What is the topic of this news article? Choose one of: {options}.",
                     "Classify the following news article into one of these categories: {options}."],
}
NLI_FIELDS = {"swa": ("Msingi", "Dhana"), "hau": ("Jumla ta farko", "Jumla ta biyu"),
              "en": ("Premise", "Hypothesis")}


# ---- reading the task files: each yields (row id, input, answer, label or None) --------------------
def read_translation(root: Path, lang: str, split: str) -> Iterator[tuple]:
    target = root / CORPORA[f"mafand-{lang}-{split}"].relpath
    source = target.with_suffix(".en")
    for path in (source, target):
        if not path.is_file():
            raise InputFileError(f"{path} not found; see docs/DATA.md, or leave translation out with --tasks")
    english = source.read_text(encoding="utf-8-sig").splitlines()
    translated = target.read_text(encoding="utf-8-sig").splitlines()
    if len(english) != len(translated):
        raise SFTSourceError(f"{source} has {len(english)} lines but {target} has {len(translated)}: not aligned")
    for number, (en, tr) in enumerate(zip(english, translated), start=1):
        if en.strip() and tr.strip():
            yield f"{target.name}:{number}", en.strip(), tr.strip(), None


def read_sentiment(root: Path, lang: str, split: str) -> Iterator[tuple]:
    path = root / CORPORA[f"afrisenti-{lang}-{split}"].relpath
    rows = read_csv_rows(path, "\t", HINT)
    need_columns(rows, path, ("tweet", "label"))
    classes = SOURCE_CLASSES["sentiment"]
    for number, row in enumerate(rows, start=2):
        if (row["label"] or "").strip() not in classes:
            raise SFTSourceError(f"{path}, line {number}: label {row['label']!r} is not one of {list(classes)}")
        word = LABELS[("sentiment", lang)][classes.index(row["label"].strip())]
        if row["tweet"].strip():
            yield f"{path.name}:{number}", row["tweet"].strip(), word, word


def read_news(root: Path, lang: str, split: str, max_chars: int) -> Iterator[tuple]:
    path = root / CORPORA[f"masakhanews-{lang}-{split}"].relpath
    rows = read_csv_rows(path, "\t", HINT)
    need_columns(rows, path, ("category", "headline", "text"))
    for number, row in enumerate(rows, start=2):
        label = row["category"].strip()
        if label not in NEWS_TOPICS:
            raise SFTSourceError(f"{path}, row {number}: category {label!r} is not one of {NEWS_TOPICS}")
        text = f"{row['headline'].strip()}\n{row['text'].strip()}".strip()
        if len(text) > max_chars:  # long articles: keep the start, cut at a word boundary
            text = text[:max_chars].rsplit(" ", 1)[0] + " ..."
        yield f"{path.name}:{number}", text, label, label


def read_nli(root: Path, lang: str, split: str) -> Iterator[tuple]:
    """Join translated premises and hypotheses to the English gold labels (see the module docstring)."""
    if split not in XNLI_SPLIT:
        return
    names = XNLI_FILES[(XNLI_SPLIT[split], lang)]
    english_path, premise_path, hypothesis_path = (root / XNLI_DIR / n for n in names)
    english, premises, hypotheses = (read_csv_rows(path, ",", HINT) for path in (english_path, premise_path,
                                                                                 hypothesis_path))
    need_columns(english, english_path, ("gold_label", "promptID", "pairID", "sentence2"))
    need_columns(premises, premise_path, ("promptID", "sentence1_translated"))
    need_columns(hypotheses, hypothesis_path, ("promptID", "sentence2", "sentence2_translated"))
    by_pair = {r["pairID"]: r["gold_label"] for r in english}
    by_text: dict[tuple, set] = {}
    for r in english:
        by_text.setdefault((r["promptID"], r["sentence2"]), set()).add(r["gold_label"])
    premise_of = {}
    for r in premises:
        premise_of.setdefault(r["promptID"], r["sentence1_translated"].strip())
    for number, r in enumerate(hypotheses, start=2):
        if "pairID" in r:
            labels = {by_pair.get(r["pairID"])} - {None}
        else:
            labels = by_text.get((r["promptID"], r["sentence2"]), set())
        if split != "test" and (seeded_choice(0, f"nli-dev|{r['promptID']}", NLI_DEV_SHARE) == 0) != (split == "dev"):
            continue  # the other side of the dev/train cut
        premise, hypothesis = premise_of.get(r["promptID"], ""), r["sentence2_translated"].strip()
        classes = SOURCE_CLASSES["nli"]
        if len(labels) != 1 or not premise or not hypothesis or next(iter(labels)) not in classes:
            continue  # unmatched or ambiguous join: skipped (stats.json shows how many rows joined)
        answer = LABELS[("nli", lang)][classes.index(next(iter(labels)))]
        row_id = f"{XNLI_SPLIT[split]}/{hypothesis_path.parent.name}/{hypothesis_path.name}:{number}"
        yield row_id, (premise, hypothesis), answer, answer


# ---- conversations ---------------------------------------------------------------------------------
def make_row(task: str, lang: str, row_id: str, source_input, answer: str, label: str | None,
             seed: int, alpaca: bool) -> dict:
    """One conversation of a task, in the format lillm.rows.read_conversations reads, with a seeded choice of phrasing."""
    phrasings = [(lang, p) for p in INSTRUCTIONS[(task, lang)]] + [("en", p) for p in INSTRUCTIONS[(task, "en")]]
    instruction_lang, phrasing = phrasings[seeded_choice(seed, f"{task}|{lang}|{row_id}", len(phrasings))]
    options = task_options(task, lang)
    words = dict(zip("abc", options or []))
    instruction = phrasing.format(lang=LANG_NAMES[lang], options=", ".join(options or []), **words)
    if task == "nli":
        first, second = NLI_FIELDS[instruction_lang]
        text = f"{first}: {source_input[0]}\n{second}: {source_input[1]}"
        source_input = f"{source_input[0]}\n{source_input[1]}"
    else:
        text = source_input
    row = {"messages": [{"role": "user", "content": render_user(instruction, text, alpaca)},
                        {"role": "assistant", "content": answer}],
           "task": task, "lang": lang, "input": source_input, "source": row_id, "instruction_lang": instruction_lang}
    if label is not None:
        row["label"], row["options"] = label, options
    return row


def task_rows(root: Path, task: str, lang: str, split: str, seed: int, alpaca: bool, limit: int | None,
              max_chars: int) -> list[dict]:
    """The conversations of one (task, language, split), at most limit of them, evenly spaced."""
    readers = {"translation": read_translation, "sentiment": read_sentiment, "nli": read_nli,
               "news": lambda *where: read_news(*where, max_chars)}
    items = evenly_spaced(list(readers[task](root, lang, split)), limit)
    return [make_row(task, lang, f"{task}-{lang}-{split}/{row_id}", source_input, answer, label, seed, alpaca)
            for row_id, source_input, answer, label in items]


# ---- the organisers' score ---------------------------------------------------------------------------
CHALLENGE_SUBSETS = (("sentiment", "hau"), ("sentiment", "swa"), ("nli", "hau"), ("nli", "swa"),
                     ("translation", "hau"), ("translation", "swa"))


def zindi_score(mean_score: float, n_params: int, reference_params: int = INKUBA_PARAMS) -> float:
    """(score + (1 - params / InkubaLM's params) * score) / 2: half the score rewards being small."""
    return (mean_score + (1 - n_params / reference_params) * mean_score) / 2


def challenge_average(scores: dict[tuple[str, str], float]) -> float | None:
    """Mean over the challenge's six subsets (F1 on 0..1, chrF / 100); None if one is missing."""
    if not all(subset in scores for subset in CHALLENGE_SUBSETS):
        return None
    return sum(scores[s] for s in CHALLENGE_SUBSETS) / len(CHALLENGE_SUBSETS)


def sentence_chrf(hypothesis: str, reference: str, max_order: int = 6, beta: float = 2.0) -> float:
    """The challenge's chrF of one sentence on 0..1 (see the module docstring for how it differs)."""
    hypothesis, reference = hypothesis.replace(" ", ""), reference.replace(" ", "")
    precision = recall = 0.0
    for n in range(1, max_order + 1):
        hyp = Counter(hypothesis[i:i + n] for i in range(len(hypothesis) - n + 1))
        ref = Counter(reference[i:i + n] for i in range(len(reference) - n + 1))
        matched = sum((hyp & ref).values())
        precision += matched / max(sum(hyp.values()), 1)
        recall += matched / max(sum(ref.values()), 1)
    precision, recall = precision / max_order, recall / max_order
    if precision + recall == 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def challenge_scores(sentiment: tuple[Sequence[int], Sequence[int]] | None,
                     nli: tuple[Sequence[int], Sequence[int]] | None,
                     translations: tuple[Sequence[str], Sequence[str]] | None, params: int) -> dict:
    """The challenge's numbers from pooled (true, predicted) class indices and (hypotheses, references):
    the organisers' score (per-sentence chrFs and the two F1s averaged as one list) and its zindi,
    the mean of the three components and its zindi. A missing task leaves the scores as None."""
    sentiment_f1 = macro_f1(*sentiment) if sentiment and sentiment[0] else None
    nli_f1 = macro_f1(*nli) if nli and nli[0] else None
    row_chrf = [sentence_chrf(h, r) for h, r in zip(*translations)] if translations else []
    mt_chrf = sum(row_chrf) / len(row_chrf) if row_chrf else None
    parts = (sentiment_f1, nli_f1, mt_chrf)
    score = None if None in parts else (sum(row_chrf) + sentiment_f1 + nli_f1) / (len(row_chrf) + 2)
    mean_of_three = None if None in parts else sum(parts) / 3
    return {"sentiment_f1": sentiment_f1, "nli_f1": nli_f1, "mt_chrf": mt_chrf, "mt_rows": len(row_chrf),
            "score": score, "zindi": None if score is None else zindi_score(score, params), "params": params,
            "mean_of_three": mean_of_three,
            "mean_of_three_zindi": None if mean_of_three is None else zindi_score(mean_of_three, params)}


def subset_score(result: dict, method: str = "likelihood") -> float | None:
    """The challenge's number for a subset: F1 by `method` (else the other) on 0..1, or chrF / 100."""
    if result["metric"] == "chrF":
        return result["greedy"] / 100 if "greedy" in result else None
    other = "greedy" if method == "likelihood" else "likelihood"
    return result.get(method, result.get(other))


# ---- prediction records and the submission file (ID, Response, Targets) ------------------------------
# The starter tells tasks and languages apart by words inside the ID; ours follow its names.
_ID_PREFIX = {("sentiment", "swa"): "sent_swahili", ("sentiment", "hau"): "sent_hausa",
              ("nli", "swa"): "xnli_swa", ("nli", "hau"): "xnli_hau",
              ("translation", "swa"): "mt_eng-swa", ("translation", "hau"): "mt_eng-hau"}
SIZE_ID = "model_size"


def submission_id(task: str, lang: str, index: int) -> str:
    return f"ID_{_ID_PREFIX[(task, lang)]}_{index:05d}"


def format_loglikelihoods(scores: Sequence[float]) -> str:
    """The Response of a classification row: what the starter's parser reads (full float precision)."""
    return "[[" + ", ".join(repr(float(s)) for s in scores) + "]]"


def parse_loglikelihoods(text: str) -> list[float]:
    """Read a classification Response: '[[a, b, c]]', 'tensor([[a, b, c]], ...)' or 'a, b, c'."""
    cleaned = re.sub(r"tensor\(|\)|\[|\]|device='[^']*'|dtype=[\w.]+", "", text)
    return [float(x) for x in cleaned.split(",") if x.strip()]


def submission_rows(predictions: list[dict], params: int) -> list[dict]:
    """Challenge rows from prediction records (see scripts/evaluate.py), then the model-size row."""
    rows = []
    for p in predictions:
        if p["task"] in ("sentiment", "nli"):
            rows.append({"ID": p["id"], "Response": format_loglikelihoods(p["loglikelihoods"]), "Targets": p["target"]})
        elif p["task"] == "translation" and p.get("greedy") is not None:
            rows.append({"ID": p["id"], "Response": p["greedy"], "Targets": p["target"]})
    rows.append({"ID": SIZE_ID, "Response": str(params), "Targets": ""})
    return rows


def submission_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["ID", "Response", "Targets"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def score_submission(text: str, where: str = "submission") -> dict:
    """Score a submission file's text as the organisers' scorer does: by words in the ID ('sent' +
    'swahili' / 'hausa', 'xnli', 'mt', 'size'), argmax of the scores, labels by position. Reads lillm's
    layout (ID,Response,Targets) and the organisers' own (an unnamed index column first, `targets`)."""
    sentiment, nli, translations, params = ([], []), ([], []), ([], []), None
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or [])
    target = "Targets" if "Targets" in fields else "targets"
    missing = {"ID", "Response", target} - fields
    if missing:
        raise SubmissionError(f"{where}: columns {sorted(missing)} are missing; the header must be ID,Response,Targets "
                              "(or the organisers' ,ID,Response,targets)")
    seen: dict[str, int] = {}
    for number, row in enumerate(reader, start=2):
        row_id = row["ID"]
        if row_id in seen:  # a copied row would be scored twice and weigh double in the F1 and chrF
            raise SubmissionError(f"{where}, line {number}: ID {row_id} repeats line {seen[row_id]}; every ID is "
                                  "one row of the test set: remove the copy")
        seen[row_id] = number
        bad = undecodable("".join(str(value) for value in row.values()))
        if bad is not None:  # text read with rows.read_text: a byte that is not UTF-8 is named, not a traceback
            raise SubmissionError(f"{where}, line {number}: {bad}; save the file as UTF-8")
        try:
            if "sent" in row_id or "xnli" in row_id:
                task = "sentiment" if "sent" in row_id else "nli"
                if task == "sentiment" and "swahili" not in row_id and "hausa" not in row_id:
                    raise SubmissionError("a sentiment ID must name its language ('swahili' or 'hausa')")
                labels = LABELS[(task, "hau" if "hausa" in row_id else "swa")]
                scores = parse_loglikelihoods(row["Response"])
                if len(scores) != len(labels):
                    raise SubmissionError(f"{len(scores)} log-likelihoods for {len(labels)} labels")
                if row[target] not in labels:
                    raise SubmissionError(f"target {row[target]!r} is not one of {', '.join(labels)}")
                pooled = sentiment if task == "sentiment" else nli
                pooled[0].append(labels.index(row[target]))
                pooled[1].append(max(range(len(scores)), key=scores.__getitem__))  # first maximum, as numpy's argmax
            elif "mt" in row_id:
                translations[0].append(row["Response"] or "")
                translations[1].append(row[target] or "")
            elif "size" in row_id:
                params = int(row["Response"])
        except (ValueError, SubmissionError) as error:
            raise SubmissionError(f"{where}, line {number} (ID {row_id}): {error}; fix the row") from None
    if params is None:
        raise SubmissionError(f"{where}: no '{SIZE_ID}' row with the parameter count in Response")
    return challenge_scores(sentiment, nli, translations if translations[0] else None, params)


def prediction_records(task: str, lang: str, rows: list[dict], result: dict) -> list[dict]:
    """One record per row: id, task, language, input, target, predictions and (MT) the row's chrF."""
    records = []
    for index, row in enumerate(rows):
        target = prompt_and_answer(row)[1]
        record = {"id": submission_id(task, lang, index) if (task, lang) in _ID_PREFIX else f"ID_{task}_{lang}_{index:05d}",
                  "task": task, "lang": lang, "input": str(row.get("input", "")), "target": target,
                  "likelihood": None, "greedy": None, "chrf": None, "source": row.get("source")}
        per_row = result.get("rows", [{}] * len(rows))[index]
        record.update({k: v for k, v in per_row.items()
                       if k in ("likelihood", "greedy", "greedy_label", "loglikelihoods", "labels_by_scoring")})
        if task == "translation" and record["greedy"] is not None:
            record["chrf"] = sentence_chrf(record["greedy"], target)
        records.append(record)
    return records


def challenge_from_records(records: list[dict], params: int, method: str = "likelihood",
                           scoring: str | None = None) -> dict:
    """The challenge's numbers from prediction records, classifying by `method` (likelihood, or
    greedy where an off-list answer is a miss; by likelihood, `scoring` picks one of the records'
    labels_by_scoring, else their own choice); MT always by its greedy translation."""
    pooled: dict[str, tuple[list[int], list[int]]] = {"sentiment": ([], []), "nli": ([], [])}
    translations: tuple[list[str], list[str]] = ([], [])
    for r in records:
        if r["task"] in pooled and (r["task"], r["lang"]) in LABELS:
            label = r.get("likelihood") if method == "likelihood" else r.get("greedy_label")
            if method == "likelihood" and scoring is not None:
                label = (r.get("labels_by_scoring") or {}).get(scoring)
            if method == "likelihood" and label is None:
                continue  # not scored (no likelihoods for this row)
            pooled[r["task"]][0].append(class_index(r["task"], r["lang"], r["target"]))
            pooled[r["task"]][1].append(class_index(r["task"], r["lang"], label))
        elif r["task"] == "translation" and r.get("greedy") is not None:
            translations[0].append(r["greedy"])
            translations[1].append(r["target"])
    if method == "greedy" and not any(r.get("greedy") is not None for r in records if r["task"] in pooled):
        pooled = {"sentiment": ([], []), "nli": ([], [])}  # no generation was run
    return challenge_scores(pooled["sentiment"], pooled["nli"], translations if translations[0] else None, params)


def baseline_records(records: list[dict], subsets: dict) -> list[dict]:
    """The records as the baselines would answer: the train majority class, or the English source copied."""
    baseline = []
    for r in records:
        subset = subsets[f"{r['task']}/{r['lang']}"]
        answer = {"likelihood": subset.get("majority"), "greedy_label": subset.get("majority"),
                  "greedy": subset.get("majority"), "labels_by_scoring": None}
        if subset["metric"] == "chrF":
            answer = {"likelihood": None, "greedy_label": None, "greedy": r["input"]}
        baseline.append({**r, **answer})
    return baseline


def evaluate_on_tasks(model, tokenizer: Tokenizer, groups: dict[tuple[str, str], list[dict]],
                      train_groups: dict | None = None, greedy: bool = True, scoring: str = "batch-prior",
                      batch_size: int = 16, max_new_tokens: int = 128, progress: bool = False,
                      translate: bool | None = None, no_repeat_ngram: int = 0,
                      length_ratio: float | None = None, beam: int = 1, copy_bias: float = 0.0) -> tuple[dict, list]:
    """Score a model on conversation rows grouped by (task, language) (lillm/evaluate.py): the
    subsets' results by "task/lang" and one prediction record per row (prediction_records).
    `greedy` also answers classification rows by generation; translations are generated when
    `translate` (default: greedy)."""
    subsets, records = {}, []
    for (task, lang), group in tqdm(groups.items(), desc="subsets", disable=not progress):
        result = evaluate_subset(model, tokenizer, group, (train_groups or {}).get((task, lang)), greedy, batch_size,
                                 max_new_tokens, scoring, translate, no_repeat_ngram, length_ratio, beam, copy_bias)
        records += prediction_records(task, lang, group, result)
        subsets[f"{task}/{lang}"] = result
    return subsets, records


def challenge_summary(records: list[dict], subsets: dict, params: int, scoring: str = "batch-prior",
                      greedy: bool = True) -> dict:
    """The challenge's numbers for the model (classification by `scoring`, and by every other scoring
    and by greedy answers beside) and for the baselines (train majority, copy the source)."""
    summary = {"model, by likelihood": challenge_from_records(records, params, "likelihood", scoring)}
    for other in SCORINGS:
        if other != scoring:
            summary[f"model, {other} scoring"] = challenge_from_records(records, params, "likelihood", other)
    if greedy:
        summary["model, by greedy answers"] = challenge_from_records(records, params, "greedy")
    summary["baseline: train majority, copy the source"] = challenge_from_records(
        baseline_records(records, subsets), params, "likelihood")
    return summary


def challenge_evaluator(tokenizer: Tokenizer, rows: list[dict], train_rows: list[dict] | None = None,
                        limit: int | None = 50, scoring: str = "batch-prior", max_new_tokens: int = 96,
                        batch_size: int = 16, no_repeat_ngram: int = 0, length_ratio: float | None = None,
                        beam: int = 1):
    """evaluate(model) for the training loop (lillm/train.py): the organisers' score and its parts on
    the challenge's subsets of `rows` (a dev split), `limit` evenly spaced rows of each; the loop logs
    them as dev_score, dev_zindi, ... and can keep the best checkpoint by dev_score (--keep-best)."""
    groups = {key: evenly_spaced(group, limit) for key, group in sorted(by_task_and_lang(rows).items())
              if key in CHALLENGE_SUBSETS}
    train_groups = by_task_and_lang(train_rows) if train_rows else None

    def evaluate(model) -> dict:
        was_training = model.training
        model.eval()
        try:
            subsets, records = evaluate_on_tasks(model, tokenizer, groups, train_groups, greedy=False, scoring=scoring,
                                                 batch_size=batch_size, max_new_tokens=max_new_tokens,
                                                 translate=True, no_repeat_ngram=no_repeat_ngram,
                                                 length_ratio=length_ratio, beam=beam)
        finally:
            model.train(was_training)
        scores = challenge_from_records(records, model.num_params(), "likelihood", scoring)
        return {f"dev_{key}": None if scores[key] is None else round(scores[key], 5)
                for key in ("score", "zindi", "sentiment_f1", "nli_f1", "mt_chrf", "mean_of_three")}

    return evaluate


# ---- pairs for preference tuning ---------------------------------------------------------------------
def _pair_row(row: dict, chosen: str, rejected: str, kind: str, **extra) -> dict:
    out = {"messages": prompt_and_answer(row)[0], "chosen": chosen, "rejected": rejected, "task": row.get("task", ""),
           "lang": row.get("lang", ""), "source": row.get("source", ""), "pair": kind}
    return out | extra


def classification_pairs(rows: list[dict], seed: int = 0, negatives: str = "one") -> list[dict]:
    """Gold label against a wrong option: one drawn by a seeded hash of the row (negatives="one"),
    or every wrong option ("all"). Rows are SFT conversations with "label" and "options"."""
    pairs = []
    for row in rows:
        wrong = [o for o in row["options"] if o != row["label"]]
        if not wrong:
            continue
        if negatives == "one":
            wrong = [wrong[seeded_choice(seed, str(row.get("source", "")) + str(row["label"]), len(wrong))]]
        pairs += [_pair_row(row, row["label"], option, "gold vs wrong label") for option in wrong]
    return pairs


@torch.no_grad()
def translation_pairs(model, tokenizer: Tokenizer, rows: list[dict], samples: int = 2, temperature: float = 0.8,
                      top_k: int | None = 50, max_new_tokens: int = 96, batch_size: int = 16, seed: int = 0,
                      progress: bool = False) -> tuple[list[dict], dict]:
    """Reference translation against the model's own sampled translation, when the sample scores lower.

    Per source sentence the model samples `samples` translations; the one with the lowest sentence
    chrF against the reference becomes the rejected answer, unless it equals the reference (chrF 100,
    nothing to prefer). Returns the pair rows and counts.
    """
    model.eval()
    max_len = model.config.max_seq_len
    budget = max(1, min(max_new_tokens, max_len // 2))
    pairs, stats = [], {"sources": len(rows), "pairs": 0, "same_as_reference": 0, "empty": 0}
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="sampling translations", disable=not progress, dynamic_ncols=True):
        chunk = rows[start:start + batch_size]
        prompts = [prompt_ids(tokenizer, prompt_and_answer(row)[0], max_len - budget) for row in chunk]
        candidates: list[list[str]] = [[] for _ in chunk]
        for k in range(samples):
            outputs = generate(model, prompts, budget, temperature=temperature, top_k=top_k, eos_id=tokenizer.eos_id,
                               pad_id=tokenizer.pad_id, seed=seed * 1_000_003 + start * samples + k)
            for i, ids in enumerate(outputs):
                candidates[i].append(tokenizer.decode(ids).strip())
        for row, texts in zip(chunk, candidates):
            reference = prompt_and_answer(row)[1]
            scored = sorted((chrf([t], [reference]), t) for t in texts if t)  # sacrebleu's chrF, 0..100
            if not scored:
                stats["empty"] += 1
                continue
            score, worst = scored[0]
            if worst == reference.strip():
                stats["same_as_reference"] += 1
                continue
            pairs.append(_pair_row(row, reference, worst, "reference vs sampled translation",
                                   rejected_chrf=round(score, 2)))
    stats["pairs"] = len(pairs)
    return pairs, stats
