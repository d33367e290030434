"""`retro-jax sample`: continue a prompt with a trained run, re-retrieving every chunk.

    retro-jax sample --workdir W --prompt TEXT [--max-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--seed S] [--no-cache] [--json]
                     [--config EXP.py[:ARG]] [--config.sample.num_neighbours=4 ...]

The config is the run's own (`W/config.json`) unless --config names an experiment file;
`--config.KEY=VALUE` overrides apply to either. Options left out take `config.sample.*`.
Prints the prompt and its continuation, then for each generated chunk the neighbours it
attended to (document title, share of CCA attention); `--json` prints one JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_config(args) -> Any:
    """The validated config: --config (with overrides) or the workdir's saved one."""
    import ml_collections

    from retro_jax.configs import config_from_args, load_saved_config, validate_config
    from retro_jax.configs.loader import parse_override

    if args.config:
        return config_from_args(args)
    config = load_saved_config(args.workdir)
    overrides = list(getattr(args, "overrides", ()) or ())
    if not overrides:
        return config
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    for assignment in overrides:
        parse_override(config, assignment, source=str(Path(args.workdir) / "config.json"))
    return validate_config(config, source=str(Path(args.workdir) / "config.json"))


def single_device_mesh(mesh_cfg):
    """A (1, 1, 1) mesh on the first device: a batch of one gains nothing from a data axis.

    (Models too large for one device would need the run's `tensor` axis here; not yet.)
    """
    import jax
    import ml_collections

    from retro_jax.models.sharding import make_mesh

    cfg = ml_collections.ConfigDict(mesh_cfg.to_dict())
    cfg.data, cfg.fsdp, cfg.tensor = 1, 1, 1
    return make_mesh(cfg, devices=jax.devices()[:1])


def sample_run(config, workdir: Path, prompt: str, *, max_tokens: int, temperature: float,
               top_k: int, top_p: float, seed: int, use_cache: bool = True,
               embedder: Any = None) -> dict:
    """Generate from the latest checkpoint of `workdir`; the result as a JSON-able dict.

    Chunks are searched with the config's retriever (`database.retriever`); `embedder` (an
    object with name, dim, embed) replaces the configured frozen BERT, and must make the
    database's kind of keys. The database is checked against the retriever's settings.
    """
    from retro_jax.sample.generate import DatabaseRetriever, attribution, generate
    from retro_jax.train.data import open_run_database, retriever_from_config
    from retro_jax.train.restore import load_trained_model

    retriever = retriever_from_config(config, embedder=embedder)
    db = open_run_database(config, workdir, retriever=retriever)
    model = load_trained_model(workdir, config, mesh=single_device_mesh(config.mesh))
    k = int(config.sample.num_neighbours)
    neighbours = None
    if model.cfg.retrieval and k > 0:
        neighbours = DatabaseRetriever(db, retriever.text_search(db), num_neighbours=k,
                                       align_max_shift=int(config.data.align_max_shift))
    tokenizer = db.tokenizer
    prompt_tokens = tokenizer.encode(prompt)
    result = generate(model, prompt_tokens, max_tokens=max_tokens,
                      max_len=int(config.data.seq_len), retriever=neighbours, num_neighbours=k,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                      use_cache=use_cache)
    records = attribution(result, db) if neighbours is not None else []
    return {
        "prompt": prompt,
        "completion": tokenizer.decode([int(t) for t in result.generated]),
        "prompt_tokens": int(result.prompt_len),
        "prompt_truncated": int(result.prompt_truncated),
        "generated_tokens": int(len(result.generated)),
        "stop_reason": result.stop_reason,
        "settings": {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
                     "num_neighbours": k if neighbours is not None else 0,
                     "max_len": int(config.data.seq_len), "cache": use_cache},
        "timings": {key: round(float(v), 4) for key, v in result.timings.items()},
        "attribution": records,
    }


def format_text(out: dict) -> str:
    """A human-readable rendering of `sample_run`'s result."""
    lines = [out["prompt"] + out["completion"], "",
             f"[{out['generated_tokens']} tokens, stop: {out['stop_reason']}, "
             f"{out['timings']['tokens_per_second']:.1f} tokens/s]"]
    if out["prompt_truncated"]:
        lines.append(f"[prompt truncated by {out['prompt_truncated']} tokens to fit "
                     f"max_len={out['settings']['max_len']}]")
    for record in out["attribution"]:
        lines.append("")
        lines.append(f"chunk {record['chunk']} (tokens {record['first_token']}-"
                     f"{record['last_token']}): {record['text']!r}")
        for n in record["neighbours"]:
            title = n["title"] or f"document {n['doc_id']}"
            lines.append(f"  {100 * n['share']:5.1f}%  {title}  (chunk {n['chunk_id']}): "
                         f"{n['text'][:80]!r}")
    return "\n".join(lines)


def run_sample(args) -> int:
    """`retro-jax sample` (see the module docstring)."""
    config = resolve_config(args)
    s = config.sample
    pick = lambda value, default: default if value is None else value  # noqa: E731
    out = sample_run(
        config, Path(args.workdir), args.prompt,
        max_tokens=int(pick(args.max_tokens, s.max_tokens)),
        temperature=float(pick(args.temperature, s.temperature)),
        top_k=int(pick(args.top_k, s.top_k)), top_p=float(pick(args.top_p, s.top_p)),
        seed=int(pick(args.seed, s.seed)), use_cache=not getattr(args, "no_cache", False))
    if getattr(args, "json", False):
        json.dump(out, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(format_text(out))
    return 0
