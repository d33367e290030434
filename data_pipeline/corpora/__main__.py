"""`python -m data_pipeline.corpora [--kind K] [--path P] ...`: a corpus' statistics.

Documents and UTF-8 bytes per split, and what was skipped, for any corpus config, e.g.

    python -m data_pipeline.corpora                                  # the embedded stdlib corpus
    python -m data_pipeline.corpora --kind jsonl --path data/x.jsonl --text-field body --json
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys

from data_pipeline.corpora.factory import corpus_statistics, format_statistics, open_corpus
from data_pipeline.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.corpora",
                                     description="documents and bytes per split of a corpus")
    for key, param in inspect.signature(open_corpus).parameters.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(param.default),
                            default=param.default,
                            help=f"config.corpus.{key} (default {param.default!r})")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    args = vars(parser.parse_args(argv))
    as_json = args.pop("json")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        statistics = corpus_statistics(**args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(statistics, indent=1) if as_json else
          f"{format_statistics(statistics)}\n  ({statistics['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
