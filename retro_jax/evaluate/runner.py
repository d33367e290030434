"""`retro-jax eval`: evaluate a trained run and write `<workdir>/eval/<split>-<mode>.json`.

    retro-jax eval --config EXP --workdir W [--split validation|test] [--neighbours K]
                   [--retrieval on|off|random|oracle] [--leakage] [--knn-lm]

Modes (the file name's <mode>):
  on        RETRO[ON]: neighbours retrieved inline for every chunk (K = eval.num_neighbours)
  off       RETRO[OFF]: the same weights, no neighbours
  random    diagnostic: K database chunks drawn at random per chunk (with continuations)
            instead of the retrieved ones; a model that uses retrieval scores ON < random
  oracle    diagnostic: each chunk's neighbour is itself followed by its true continuation
            (slot 0, the others empty): how much copying could gain; oracle << OFF means the
            model can copy from its neighbours
  baseline  a run with model.retrieval=False (no CCA); --retrieval is ignored
  knn-lm    the run's model (a baseline, as in the paper) interpolated with a kNN datastore
            built over the database's train split (kept in W/eval/knn_lm/ and reused)

`--leakage` adds the leakage-filtered bpb(alpha) curve (paper section 2.6) to the JSON and
plots every curve of the split found in W/eval/ (on, off, baseline, ...) to
W/eval/<split>-leakage.png; the baseline of another run directory joins the plot through
`retro-jax report W_RETRO W_BASELINE --out results.md`.

Several processes (a pod slice: the same command on every host; `maybe_initialize_distributed`
connects them as for `retro-jax train`): each process scores its share of the windows and of
the leakage chunks, the per-window sums are gathered and reduced in document order on every
process (retro_jax/evaluate/evaluator.py), process 0 writes the result file and the plot, and
every process returns the same record, the one a single process would have written (timing
aside). kNN-LM stays single-process: its datastore and search are local to one host.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from retro_jax.evaluate.evaluator import EvalResult, evaluate
from retro_jax.evaluate.knn_lm import Datastore, DatastoreSearcher, KnnLM, build_datastore
from retro_jax.evaluate.leakage import chunk_num_bytes, chunk_overlaps, leakage_curve
from retro_jax.evaluate.plots import plot_leakage
from retro_jax.evaluate.results import (
    EVAL_DIR,
    RESULT_FORMAT,
    collect_leakage_curves,
    eval_mode,
    result_path,
    write_json,
)

log = logging.getLogger(__name__)


def latest_step(workdir: Path) -> int | None:
    """The step of the run's newest checkpoint, or None (informational: never raises)."""
    try:
        from retro_jax.train.checkpoint import Checkpointer, resolve_checkpoint_dir

        ckpt = Checkpointer(resolve_checkpoint_dir(workdir), read_only=True)
        step = ckpt.latest_step()
        ckpt.close()
        return None if step is None else int(step)
    except Exception:  # noqa: BLE001 (informational only)
        return None


def knn_datastore(config, workdir: Path, db, scorer, *, step: int | None,
                  max_entries: int, progress: bool = True) -> Datastore:
    """The run's kNN-LM datastore over the train split (built once, then reused)."""
    from data_pipeline.input_pipeline import make_eval_windows

    directory = Path(workdir) / EVAL_DIR / "knn_lm"
    n = int(config.data.seq_len)
    meta = {"step": step, "seq_len": n, "max_entries": int(max_entries),
            "db_train_chunks": int(db.split("train").tokens.shape[0]),
            "tokenizer_sha256": (db.manifest.get("tokenizer") or {}).get("sha256")}
    if (directory / "datastore.json").is_file():
        store, saved = Datastore.load(directory)
        if all(saved.get(k) == v for k, v in meta.items()):
            log.info("kNN-LM datastore: %d entries from %s", len(store), directory)
            return store
        log.info("kNN-LM datastore in %s is stale (other checkpoint/database); rebuilding",
                 directory)
    windows = make_eval_windows(db, "train", n, n, batch_size=int(config.eval.batch_size))

    def hidden_fn(inputs):
        return scorer(inputs, None, np.zeros_like(inputs))[1]

    log.info("building the kNN-LM datastore over the train split (at most %d entries)",
             max_entries)
    store = build_datastore(hidden_fn, windows.as_numpy_iterator(), max_entries=max_entries)
    store.save(directory, meta)
    return store


def evaluate_run(
    config,
    workdir: str | Path,
    *,
    split: str | None = None,
    num_neighbours: int | None = None,
    retrieval: str = "on",
    leakage: bool = False,
    knn_lm: bool = False,
    knn_max_entries: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate the latest checkpoint of `workdir`; write and return the result record."""
    from retro_jax.train.multihost import maybe_initialize_distributed, sync

    maybe_initialize_distributed()  # before anything touches a device
    import jax

    from retro_jax.configs import ConfigError
    from retro_jax.evaluate.scoring import count_parameters, make_scorer
    from retro_jax.models.sharding import logical_axis_rules, make_mesh
    from retro_jax.train.restore import load_trained_model

    if knn_lm and jax.process_count() > 1:
        raise ConfigError(
            f"--knn-lm runs in one process, found {jax.process_count()} processes: the kNN-LM "
            "datastore and its search live on one host. Run it on a single host (without "
            "JAX_COORDINATOR_ADDRESS / a multi-host slice), e.g. on worker 0 of the slice with "
            "mesh.data set to its local devices")
    is_main = jax.process_index() == 0
    workdir = Path(workdir)
    split = split or config.eval.split
    if knn_max_entries is None:
        knn_max_entries = int(config.eval.knn_lm_max_entries)
    k_on = int(num_neighbours if num_neighbours is not None else config.eval.num_neighbours)
    mode = eval_mode(bool(config.model.retrieval), retrieval, knn_lm)
    from retro_jax.train.data import open_run_database

    db = open_run_database(config, workdir)
    mesh = make_mesh(config.mesh)
    rules = logical_axis_rules(config.mesh)
    model = load_trained_model(workdir, config, mesh=mesh)
    step = latest_step(workdir)
    k = k_on if mode in ("on", "random", "oracle") else 0
    neighbour_source = mode if mode in ("random", "oracle") else "retrieved"

    knn = None
    knn_info = None
    if mode == "knn-lm":
        if config.model.retrieval:
            log.warning("kNN-LM on a retrieval model: its CCA layers get no neighbours (the "
                        "paper interpolates a baseline)")
        scorer = make_scorer(model, mesh=mesh, rules=rules, with_hidden=True)
        store = knn_datastore(config, workdir, db, scorer, step=step,
                              max_entries=knn_max_entries, progress=progress)
        searcher = DatastoreSearcher(store, index_settings=config.index.to_dict(),
                                     k=config.eval.knn_lm_k)
        knn = KnnLM(searcher, k=config.eval.knn_lm_k, temperature=config.eval.knn_lm_temperature,
                    lam=config.eval.knn_lm_lambda)
        knn_info = {"entries": len(store), "k": int(config.eval.knn_lm_k),
                    "lambda": float(config.eval.knn_lm_lambda),
                    "temperature": float(config.eval.knn_lm_temperature),
                    "search": searcher.kind, "max_entries": int(knn_max_entries)}

    result = evaluate(model, db, split, seq_len=int(config.data.seq_len),
                      stride=int(config.eval.stride), num_neighbours=k,
                      batch_size=int(config.eval.batch_size), overfetch=int(config.data.overfetch),
                      max_documents=int(config.eval.max_documents), per_chunk=leakage, knn=knn,
                      neighbour_source=neighbour_source,
                      align_max_shift=int(config.data.align_max_shift), mesh=mesh, rules=rules,
                      progress=progress)
    params = count_parameters(model)
    record = make_record(config, result, mode=mode, step=step, params=params, db=db,
                         knn=knn_info)
    if leakage:
        record["leakage"] = leakage_section(config, db, split, result)
    path = result_path(workdir, split, mode)
    png = workdir / EVAL_DIR / f"{split}-leakage.png"
    if is_main:
        write_json(path, record)
        log.info("wrote %s", path)
        if leakage:
            curves = collect_leakage_curves([workdir], split)
            png = plot_leakage(curves, png, title=f"{config.name}: {split}, leakage-filtered")
    if leakage:
        record["leakage_plot"] = str(png)
    sync(f"eval-{split}-{mode}-written")  # the file exists when any process returns
    return record


def make_record(config, result: EvalResult, *, mode: str, step, params: dict, db,
                knn: dict | None = None) -> dict:
    """The result file's content (format RESULT_FORMAT)."""
    metric = str(config.eval.metric)
    overall = result.overall
    value = overall.word_perplexity if metric == "word_ppl" else overall.bits_per_byte
    train = (db.manifest.get("splits") or {}).get("train") or {}
    return {
        "format": RESULT_FORMAT,
        "name": str(config.name), "mode": mode, "split": result.split,
        "corpus": str(config.corpus.kind), "metric": metric,
        "value": None if not np.isfinite(value) else float(value),
        "step": step, "model_size": str(config.model.size),
        "params": params["total"], "non_embedding_params": params["non_embedding"],
        "db_chunks": int(train.get("num_chunks", 0)), "db_tokens": train.get("num_tokens"),
        "max_documents": int(config.eval.max_documents),
        "knn_lm": knn,
        **result.to_json(),
    }


def leakage_section(config, db, split: str, result: EvalResult) -> dict:
    """bpb(alpha) over the scored chunks, with r(C) from eval.leakage_neighbours neighbours."""
    from retro_jax.train.multihost import gather_shares, process_share

    chunk_ids = np.flatnonzero(result.chunk_tokens > 0)
    # Each process measures a contiguous share of the chunks; r(C) and bytes are exact
    # (integer ratios and counts), so the gathered arrays are those of one process.
    mine = chunk_ids[process_share(chunk_ids.size)]
    ratios = np.zeros(0, np.float64)
    chunk_bytes = np.zeros(0, np.int64)
    if mine.size:
        ratios = chunk_overlaps(db, split, mine,
                                num_neighbours=int(config.eval.leakage_neighbours),
                                overfetch=int(config.data.overfetch))
        tokens = np.asarray(db.split(split).tokens[mine])
        chunk_bytes = chunk_num_bytes(tokens, db.tokenizer.decode)
    ratios = gather_shares(ratios, chunk_ids.size)
    chunk_bytes = gather_shares(chunk_bytes, chunk_ids.size)
    curve = leakage_curve(ratios, result.chunk_nll[chunk_ids], chunk_bytes,
                          tuple(config.eval.alphas))
    return {"neighbours": int(config.eval.leakage_neighbours), "chunks": int(chunk_ids.size),
            "mean_overlap": float(ratios.mean()) if ratios.size else None,
            "curve": curve}


def run_eval(args) -> int:
    """CLI entry (retro_jax/cli.py): evaluate, write the JSON, print a table."""
    from retro_jax.train.multihost import maybe_initialize_distributed

    maybe_initialize_distributed()  # a pod slice: every host evaluates its share
    import jax

    from retro_jax.configs import config_from_args
    from retro_jax.evaluate.report import format_eval_table

    config = config_from_args(args, num_devices=jax.device_count())
    record = evaluate_run(config, args.workdir, split=args.split, num_neighbours=args.neighbours,
                          retrieval=args.retrieval, leakage=args.leakage,
                          knn_lm=getattr(args, "knn_lm", False),
                          progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        print(format_eval_table(record))
        print(f"\nwritten: {result_path(args.workdir, record['split'], record['mode'])}")
    return 0
