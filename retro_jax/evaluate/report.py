"""`retro-jax report W... [--out results.md]`: evaluation results beside the paper's figures.

Reads every `<W>/eval/*.json` written by `retro-jax eval` and prints three markdown tables:

1. one row per model (a run's RETRO with its [ON], [OFF], random-neighbour and oracle results
   side by side; a baseline;
   a kNN-LM) and split: the corpus it read (kind and path, from the run's config.json, with
   any disagreement of the result or the database noted), parameters, database size, k,
   the metric with retrieval on and off, bpb filtered at each leakage threshold alpha, and
   the paper's figure for the same row (Wikitext103 word perplexity, Table 4) where there is
   one;
2. bits per byte per subset (document source, e.g. the Pile's pile_set_name) when a result
   has more than one subset;
3. every leakage curve, one row per model and mode.

With `--out`, the markdown is also written there and the leakage curves of all runs are
plotted to `<out stem>-leakage.png`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from retro_jax.evaluate.plots import plot_leakage
from retro_jax.evaluate.results import (
    RETRIEVAL_MODES,
    collect_leakage_curves,
    load_results,
    run_corpus,
)

# Wikitext103 word perplexity (valid, test), RETRO paper Table 4.
PAPER_WIKITEXT103 = {
    "baseline": ("baseline transformer", 21.53, 22.96),
    "knn-lm": ("kNN-LM", 18.52, 19.54),
    "retro": ("RETRO, Wikipedia DB", 18.46, 18.97),
}
_SPLIT_INDEX = {"validation": 1, "test": 2}


def paper_figure(corpus: str, kind: str, split: str) -> tuple[str, float] | None:
    """(label, value) of the paper's figure for a row, or None."""
    if corpus != "wikitext103" or split not in _SPLIT_INDEX or kind not in PAPER_WIKITEXT103:
        return None
    row = PAPER_WIKITEXT103[kind]
    return row[0], row[_SPLIT_INDEX[split]]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and value >= 10_000:
        return _human(value)
    return str(value)


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _metric_value(record: dict):
    overall = record.get("overall", {})
    if record.get("metric") == "word_ppl":
        return overall.get("word_perplexity")
    return overall.get("bits_per_byte")


def _kind(mode: str) -> str:
    return "retro" if mode in RETRIEVAL_MODES else mode


def _alphas(records: Iterable[dict]) -> list[float]:
    alphas = set()
    for r in records:
        for point in (r.get("leakage") or {}).get("curve", []):
            alphas.add(float(point["alpha"]))
    return sorted(alphas)


def _filtered(record: dict | None, alpha: float):
    if not record:
        return None
    for point in (record.get("leakage") or {}).get("curve", []):
        if abs(float(point["alpha"]) - alpha) < 1e-9:
            return point.get("bpb")
    return None


def model_rows(records: list[dict]) -> list[dict]:
    """Group result records into rows: (workdir, name, split, kind) with on/off/single."""
    rows: dict[tuple, dict] = {}
    for r in records:
        kind = _kind(r["mode"])
        key = (r.get("workdir"), r.get("name"), r.get("split"), kind)
        row = rows.setdefault(key, {"kind": kind, "records": {}})
        row["records"][r["mode"]] = r
    return list(rows.values())


def results_table(records: list[dict]) -> str:
    """Markdown: one row per model and split, beside the paper's figure."""
    alphas = _alphas(records)
    header = ["model", "corpus (kind, path)", "split", "metric", "params (non-emb.)",
              "DB chunks", "k", "retrieval on", "retrieval off", "random neighbours",
              "oracle neighbours"]
    header += [f"bpb α≤{a * 100:g}%" for a in alphas]
    header += ["paper (Table 4)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in model_rows(records):
        recs = row["records"]
        kind = row["kind"]
        main = recs.get("on") or recs.get("off") or next(iter(recs.values()))
        label = {"retro": "RETRO", "baseline": "baseline", "knn-lm": "kNN-LM"}.get(kind, kind)
        name = f"{main.get('name', '?')} ({label})"
        random = oracle = None
        if kind == "retro":
            on, off, random, oracle = (_metric_value(recs[m]) if m in recs else None
                                       for m in RETRIEVAL_MODES)
            k = recs["on"].get("num_neighbours") if "on" in recs else None
        elif kind == "knn-lm":  # retrieval from the kNN datastore
            on, off, k = _metric_value(main), None, (main.get("knn_lm") or {}).get("k")
        else:
            on, off, k = None, _metric_value(main), None
        params = main.get("params")
        non_emb = main.get("non_embedding_params")
        params_text = f"{_fmt(params)} ({_fmt(non_emb)})" if params is not None else "–"
        paper = paper_figure(main.get("corpus", ""), kind, main.get("split", ""))
        corpus = run_corpus(main["workdir"], main) if main.get("workdir") else main.get(
            "corpus", "?")
        cells = [name, corpus.replace("|", "\\|"), main.get("split", "?"),
                 main.get("metric", "?"), params_text, _fmt(main.get("db_chunks")),
                 _fmt(k), _fmt(on), _fmt(off), _fmt(random), _fmt(oracle)]
        cells += [_fmt(_filtered(main, a)) for a in alphas]
        cells += [f"{paper[1]:.2f} ({paper[0]})" if paper else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def subsets_table(records: list[dict]) -> str | None:
    """Markdown: bpb per subset (document source), one column per model and mode."""
    multi = [r for r in records if len(r.get("by_source") or {}) > 1]
    if not multi:
        return None
    columns = [f"{r.get('name')} [{r['mode'].upper()}] {r.get('split')}" for r in multi]
    sources = sorted({s for r in multi for s in r["by_source"]})
    lines = ["| subset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for source in sources:
        cells = [_fmt((r["by_source"].get(source) or {}).get("bits_per_byte")) for r in multi]
        lines.append(f"| {source or '(none)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def leakage_table(records: list[dict]) -> str | None:
    """Markdown: bpb(alpha) and the share of chunks kept, one row per model and mode."""
    with_curve = [r for r in records if r.get("leakage")]
    if not with_curve:
        return None
    alphas = _alphas(with_curve)
    header = ["model", "split"] + [f"α≤{a * 100:g}%" for a in alphas]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in with_curve:
        points = {float(p["alpha"]): p for p in r["leakage"]["curve"]}
        cells = []
        for a in alphas:
            p = points.get(a)
            cells.append("–" if not p or p.get("bpb") is None
                         else f"{p['bpb']:.3f} ({100 * (p.get('fraction') or 0):.0f}%)")
        lines.append(f"| {r.get('name')} [{r['mode'].upper()}] | {r.get('split')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_report(workdirs) -> str:
    records = load_results(workdirs)
    if not records:
        return ("No evaluation results found under " + ", ".join(str(w) for w in workdirs)
                + " (run `retro-jax eval --config EXP --workdir W` first).")
    parts = ["## Evaluation results", "", results_table(records), "",
             "Metric: word_ppl = perplexity per word of the original text (Wikitext103); "
             "bpb = bits per UTF-8 byte. Filtered columns: bpb over the evaluation chunks whose "
             "longest token overlap with their retrieved training neighbours is <= alpha "
             "(paper section 2.6). Random neighbours: database chunks drawn at random instead "
             "of the retrieved ones (a model that uses retrieval is worse with them than with its "
             "own); oracle: each chunk's true continuation as its neighbour (`retro-jax eval "
             "--retrieval random|oracle`)."]
    subsets = subsets_table(records)
    if subsets:
        parts += ["", "## Bits per byte per subset", "", subsets]
    leakage = leakage_table(records)
    if leakage:
        parts += ["", "## Leakage-filtered bits per byte (share of chunks kept)", "", leakage]
    return "\n".join(parts) + "\n"


def format_eval_table(record: dict) -> str:
    """The table `retro-jax eval` prints for one result: overall and per subset."""
    header = ("| subset | docs | tokens | bytes | words | nll/token | ppl | word ppl | bpb |\n"
              "|---|---|---|---|---|---|---|---|---|")
    rows = [("all", record["overall"])] + sorted((record.get("by_source") or {}).items())
    if len(rows) == 2:  # one subset: it is the overall row
        rows = rows[:1]
    lines = [f"{record.get('name')} [{record['mode'].upper()}] on {record['split']}: "
             f"k={record.get('num_neighbours')}, n={record.get('seq_len')}, "
             f"stride={record.get('stride')}", "", header]
    for name, t in rows:
        lines.append(
            f"| {name or '(none)'} | {t['documents']} | {t['tokens']} | {t['bytes']} | "
            f"{t['words']} | {_fmt(t.get('nll_per_token'))} | {_fmt(t.get('perplexity'), 2)} | "
            f"{_fmt(t.get('word_perplexity'), 2)} | {_fmt(t.get('bits_per_byte'))} |")
    leakage = record.get("leakage")
    if leakage:
        lines += ["", "| alpha | bpb | chunks kept |", "|---|---|---|"]
        for p in leakage["curve"]:
            lines.append(f"| {p['alpha'] * 100:g}% | {_fmt(p['bpb'])} | {p['chunks']} |")
    timing = record.get("timing") or {}
    if timing.get("tokens_per_second"):
        lines += ["", f"{timing['tokens_per_second']:.0f} tokens/s after the first batch "
                      f"({timing['seconds']:.1f} s in all)"]
    return "\n".join(lines)


def run_report(args) -> int:
    """CLI entry: print the report; with --out, write it and the combined leakage plot."""
    text = build_report(args.workdirs)
    print(text)
    out = getattr(args, "out", None)
    if out:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        curves = collect_leakage_curves(args.workdirs)
        if curves:
            png = plot_leakage(curves, out.with_name(out.stem + "-leakage.png"))
            print(f"written: {out}, {png}")
        else:
            print(f"written: {out}")
    return 0
