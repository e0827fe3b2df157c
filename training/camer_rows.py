"""Score CA-MER label rows against prediction rows, reporting every row that cannot be used.

Label rows: ``{"id", "label", "audio_label", "video_label"}`` (extra keys ignored, so a dataset
manifest works as a label file); each label is a vocabulary name or synonym, or a list of them.
Prediction rows: ``{"id", "prediction"}`` where prediction is free text or a list of strings,
optionally ``"attention": {modality name: share}``. Ids are strings or integers, compared as
strings (``7`` and ``"7"`` are the same sample).

Nothing is dropped silently. Every problem becomes an entry ``{"kind", "source", "line", "id",
"detail"}`` of the report's ``problems`` list, and ``problem_counts`` counts them per kind:

- ``malformed_row``: not an object, or no string/integer ``id`` (skipped);
- ``duplicate_id``: an id seen before in the same file (the first row is kept);
- ``unparsable_label``: a label row whose labels are not in the vocabulary (no subset; skipped);
- ``unknown_id``: a prediction whose id has no label row (ignored);
- ``missing_prediction``: a labelled sample without a prediction row (scored 0);
- ``unparsable_prediction``: a prediction naming no known label, or not a string/list (scored 0);
- ``bad_attention``: attention shares that are not modality -> share in [0, 1] (shares ignored).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from .camer import CamerAccumulator, assign_subset, check_attention
from .labels import normalize_label_set, parse_labels

LABELS, PREDICTIONS = "labels", "predictions"
PROBLEM_KINDS = (
    "malformed_row",
    "duplicate_id",
    "unparsable_label",
    "unknown_id",
    "missing_prediction",
    "unparsable_prediction",
    "bad_attention",
)


def _numbered(rows: Iterable) -> list[tuple[int, object]]:
    """Accept plain rows or ``(line, row)`` pairs (as :func:`read_jsonl` returns)."""
    out = []
    for index, item in enumerate(rows, start=1):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int):
            out.append(item)
        else:
            out.append((index, item))
    return out


def _row_id(row) -> str | None:
    if (
        isinstance(row, Mapping)
        and isinstance(row.get("id"), (str, int))
        and not isinstance(row.get("id"), bool)
    ):
        return str(row["id"])
    return None


def _index_rows(rows, source: str, problems: list) -> dict[str, tuple[int, Mapping]]:
    """id -> (line, row) keeping the first row per id; malformed rows and duplicates go to problems."""
    by_id: dict[str, tuple[int, Mapping]] = {}
    for line, row in rows:
        row_id = _row_id(row)
        if row_id is None:
            what = "an object with a string or integer 'id'"
            problems.append(
                _problem("malformed_row", source, line, None, f"expected {what}, got {_short(row)}")
            )
        elif row_id in by_id:
            first = by_id[row_id][0]
            problems.append(
                _problem(
                    "duplicate_id", source, line, row_id, f"id first seen on line {first}; kept that row"
                )
            )
        else:
            by_id[row_id] = (line, row)
    return by_id


def _problem(kind, source, line, row_id, detail) -> dict:
    return {"kind": kind, "source": source, "line": line, "id": row_id, "detail": detail}


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def evaluate_rows(label_rows: Iterable, prediction_rows: Iterable, *, progress: bool = False) -> dict:
    """The CA-MER report for label and prediction rows (plain dicts or ``(line, dict)`` pairs).

    Returns ``{"subsets", "conflict_gap", "excluded", ["attention_share"], "n_labels",
    "n_predictions", "problems", "problem_counts"}`` (see the module docstring). ``progress``
    shows a tqdm bar over the labelled samples.
    """
    problems: list[dict] = []
    labels = _index_rows(_numbered(label_rows), LABELS, problems)
    predictions = _index_rows(_numbered(prediction_rows), PREDICTIONS, problems)
    acc = CamerAccumulator()

    samples = labels.items()
    if progress:
        from tqdm import tqdm

        samples = tqdm(samples, total=len(labels), desc="scoring", unit="sample")
    for row_id, (line, row) in samples:
        try:
            truth = normalize_label_set(row.get("label"))
            audio = normalize_label_set(row.get("audio_label"))
            video = normalize_label_set(row.get("video_label"))
        except (TypeError, ValueError) as e:
            problems.append(_problem("unparsable_label", LABELS, line, row_id, str(e)))
            continue
        predicted, attention = _read_prediction(row_id, line, predictions.get(row_id), problems)
        acc.add(assign_subset(audio, video, truth), predicted, truth, attention)

    for row_id, (line, _) in predictions.items():
        if row_id not in labels:
            problems.append(_problem("unknown_id", PREDICTIONS, line, row_id, "no label row has this id"))

    report = acc.result()
    report["n_labels"] = len(labels)
    report["n_predictions"] = len(predictions)
    problems.sort(key=lambda p: (p["source"] != LABELS, p["line"] or 0, p["kind"]))
    report["problems"] = problems
    counts = Counter(p["kind"] for p in problems)
    report["problem_counts"] = {kind: counts[kind] for kind in PROBLEM_KINDS if counts[kind]}
    return report


def _read_prediction(row_id, label_line, entry, problems) -> tuple[tuple[str, ...], dict | None]:
    """(predicted labels, attention shares) of one sample; () when missing or unparsable."""
    if entry is None:
        problems.append(
            _problem("missing_prediction", LABELS, label_line, row_id, "no prediction row; scored 0")
        )
        return (), None
    line, row = entry
    try:
        predicted = parse_labels(row.get("prediction"))
    except TypeError as e:
        predicted, detail = (), f"{e}; scored 0"
    else:
        detail = f"no known label in {_short(row.get('prediction'))}; scored 0"
    if not predicted:
        problems.append(_problem("unparsable_prediction", PREDICTIONS, line, row_id, detail))
    attention = None
    if row.get("attention") is not None:
        try:
            attention = check_attention(row["attention"])
        except (TypeError, ValueError) as e:
            problems.append(_problem("bad_attention", PREDICTIONS, line, row_id, f"{e}; shares ignored"))
    return predicted, attention
