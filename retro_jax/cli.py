"""`retro-jax <command>`: the command line.

    retro-jax build-db --config experiments/X.py[:ARG] --workdir W [--config.a.b=V ...]
                       [--runner beam --beam-options="--runner=DirectRunner ..."]
    retro-jax precompute-neighbours --config ... --workdir W [--runner beam ...]
    retro-jax train    --config ... --workdir W
    retro-jax eval     --config ... --workdir W [--split S] [--neighbours K]
                       [--retrieval on|off|random|oracle]
    retro-jax sample   --workdir W --prompt TEXT [--max-tokens N ...]
    retro-jax sweep    EXP... --workdir ROOT
    retro-jax report   W...
    retro-jax params   --config ...
    retro-jax plot     W... --out loss.png
    retro-jax compile  --config ... --topology v5p:4x4x4   (ahead-of-time: memory, FLOPs, MFU)
    retro-jax demo     --workdir runs/demo

Heavy libraries (jax, tensorflow) are imported only by the command that runs, so `--help`
is instant. Each command's implementation lives in the module named in COMMANDS.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from retro_jax.configs.validate import ConfigError

# command -> (module, function, one-line help). The function takes the parsed args.
COMMANDS = {
    "build-db": ("retro_jax.build_db", "run_build_db",
                 "tokenizer, chunks, frozen-BERT keys and ScaNN index: the retrieval database"),
    "precompute-neighbours": ("retro_jax.build_db", "run_precompute_neighbours",
                              "retrieve every training chunk's neighbours once, ahead of "
                              "training (data.precomputed_neighbours)"),
    "train": ("retro_jax.train.loop", "run_train",
              "train RETRO (or its baseline) on a device mesh, resuming from W"),
    "eval": ("retro_jax.evaluate.runner", "run_eval",
             "perplexity / bits-per-byte with retrieval on or off, leakage-filtered"),
    "sample": ("retro_jax.sample.cli", "run_sample",
               "generate text with re-retrieval every chunk, with attribution"),
    "sweep": ("retro_jax.sweep", "run_sweep",
              "train + evaluate several experiments, then a results table and charts"),
    "report": ("retro_jax.evaluate.report", "run_report",
               "a markdown table of evaluation results beside the paper's figures"),
    "params": ("retro_jax.models.params", "run_params",
               "parameter counts (embedding, decoder, CCA, encoder) without allocating"),
    "plot": ("retro_jax.train.plot", "run_plot", "loss curves of one or several runs to PNG"),
    "compile": ("retro_jax.train.aot", "run_compile",
                "compile the train step ahead of time for a TPU topology: per-device memory "
                "against HBM, FLOPs, predicted step time and MFU"),
    "demo": ("retro_jax.demo", "run_demo",
             "the end-to-end job on the embedded corpus (what `make demo` runs)"),
}


class NotBuiltYet(RuntimeError):
    """A command whose implementation has not landed yet."""


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required, metavar="EXP.py[:ARG]",
                   help="experiment file, optionally with a variant, e.g. "
                        "experiments/demo.py:runlocal")
    p.add_argument("--workdir", type=Path, required=required, metavar="DIR",
                   help="run directory: database, checkpoints, metrics, evaluation results")


def _add_runner_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", choices=("local", "beam"), default="local",
                   help="local: every stage in this process; beam: Apache Beam pipelines "
                        "(install with pip install -e '.[beam]')")
    p.add_argument("--beam-options", default="", metavar="OPTIONS",
                   help="Beam pipeline options as one string, e.g. \"--runner=DirectRunner "
                        "--direct_num_workers=2 --direct_running_mode=multi_processing\" "
                        "(or --runner=DataflowRunner --project=... --region=... "
                        "--temp_location=gs://...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retro-jax",
        description="RETRO, the Retrieval-Enhanced Transformer, in JAX/Flax. "
                    "Config overrides: --config.KEY=VALUE (e.g. --config.train.num_steps=100).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `retro-jax COMMAND --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str) -> argparse.ArgumentParser:
        help_text = COMMANDS[name][2]
        return sub.add_parser(name, help=help_text, description=help_text)

    p = add("build-db")
    _add_config_args(p)
    p.add_argument("--force", action="store_true",
                   help="rebuild even if a complete database exists (a partial one resumes)")
    _add_runner_args(p)

    p = add("precompute-neighbours")
    _add_config_args(p)
    p.add_argument("--split", default="train",
                   help="the split whose chunks query the database (default: train)")
    p.add_argument("--force", action="store_true",
                   help="recompute even if matching precomputed neighbours exist")
    _add_runner_args(p)
    p.add_argument("--fanout", default="", metavar="UxP",
                   help="Beam: each element searches U query blocks against P index shards "
                        "and merges them before the shuffle (default 16x1; the Pile plan in "
                        "docs/notes/pile_build_plan.md uses 256x16)")

    p = add("train")
    _add_config_args(p)

    p = add("eval")
    _add_config_args(p)
    p.add_argument("--split", choices=("validation", "test"), default=None,
                   help="evaluation split (default: config eval.split)")
    p.add_argument("--neighbours", type=int, default=None, metavar="K",
                   help="neighbours per chunk (default: config eval.num_neighbours, 10)")
    p.add_argument("--retrieval", choices=("on", "off", "random", "oracle"), default="on",
                   help="RETRO[ON]; RETRO[OFF] (the same weights with no neighbours); or a "
                        "retrieval diagnostic: random (database chunks drawn at random instead "
                        "of the retrieved ones) or oracle (each chunk's own continuation as "
                        "its neighbour: the most copying can gain)")
    p.add_argument("--leakage", action="store_true",
                   help="also compute the leakage-filtered bpb(alpha) curve")
    p.add_argument("--knn-lm", action="store_true",
                   help="evaluate the kNN-LM interpolation of a baseline model instead")

    p = add("sample")
    p.add_argument("--workdir", type=Path, required=True, metavar="DIR",
                   help="a trained run directory (its config and database are used)")
    p.add_argument("--config", default=None, metavar="EXP.py[:ARG]",
                   help="experiment file (default: the config saved in the workdir)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="keep the K most likely tokens (0=off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1=off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--no-cache", action="store_true", help="recompute everything every token")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    p = add("sweep")
    p.add_argument("experiments", nargs="+", metavar="EXP.py[:ARG]", help="experiment files")
    p.add_argument("--workdir", type=Path, required=True, metavar="ROOT",
                   help="one subdirectory per experiment, plus results.md and charts")

    p = add("report")
    p.add_argument("workdirs", nargs="+", type=Path, metavar="W", help="run directories")
    p.add_argument("--out", type=Path, default=None, help="write the markdown table here too")

    p = add("params")
    p.add_argument("--config", required=True, metavar="EXP.py[:ARG]", help="experiment file")

    p = add("plot")
    p.add_argument("workdirs", nargs="+", type=Path, metavar="W", help="run directories")
    p.add_argument("--out", type=Path, default=Path("loss.png"), help="PNG file to write")
    p.add_argument("--metric", default="loss",
                   help="metric from metrics.jsonl (default: loss), several comma-separated, or "
                        "a group: 'diagnostics' (loss with retrieved, no, random and oracle "
                        "neighbours) or 'cca' (each CCA layer's output norm relative to the "
                        "residual stream)")

    p = add("compile")
    p.add_argument("--config", required=True, metavar="EXP.py[:ARG]", help="experiment file")
    p.add_argument("--topology", default="v5p:4x4x4",
                   help="TPU topology name for jax.experimental.topologies, e.g. v5p:2x2x4 "
                        "(v5p-32); 'cpu' = this process's CPU devices (no libtpu)")
    p.add_argument("--json", action="store_true",
                   help="print only the JSON report (one line), not the summary")
    p.add_argument("--hbm-gib", type=float, default=None, metavar="GIB",
                   help="HBM per chip (default: the chip table in retro_jax/train/aot.py)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="TFLOPS",
                   help="peak bf16 TFLOP/s per chip (default: the chip table)")

    p = add("demo")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), metavar="DIR",
                   help="where the demo's database, runs and plots go")
    p.add_argument("--quick", action="store_true",
                   help="a reduced demo (fewer chunks and steps), as CI runs it")
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate '--config.a.b=V' (or '--config.a.b V') from the other arguments."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {arg}: missing value")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_overrides(argv)
    except ConfigError as e:
        print(f"retro-jax: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(rest)
    args.overrides = overrides
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        # orbax logs every file it writes and warns about read-only managers at WARNING.
        logging.getLogger("absl").setLevel(logging.ERROR)
    module_name, func_name, _ = COMMANDS[args.command]
    try:
        module = importlib.import_module(module_name)
        func = getattr(module, func_name)
    except (ImportError, AttributeError) as e:
        if isinstance(e, ImportError) and e.name and not e.name.startswith(
                module_name.split(".")[0]):
            raise
        print(f"retro-jax {args.command}: not implemented yet ({module_name}.{func_name} "
              "has not landed).", file=sys.stderr)
        return 3
    from data_pipeline.errors import DataError

    try:
        result = func(args)
    except ConfigError as e:
        print(f"retro-jax {args.command}: config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"retro-jax {args.command}: data error: {e}", file=sys.stderr)
        return 2
    except NotBuiltYet as e:
        print(f"retro-jax {args.command}: not implemented yet: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"retro-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
