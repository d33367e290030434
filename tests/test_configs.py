"""Config system: every experiment file and variant validates; every kind of mistake is caught
and named; the small-config recipe; the corpus fallback of `:runlocal`."""

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _experiment_specs import PAPER, specs

from retro_jax.configs import (
    ConfigError,
    default_cca_layers,
    get_base_config,
    load_config,
    load_saved_config,
    mesh_shape,
    save_config,
    validate_config,
)
from retro_jax.configs.base import PAPER_SIZES
from retro_jax.configs.loader import load_experiment_module
from retro_jax.configs.paper import SIZE_VARIANTS, TPU_SLICE, paper_config
from retro_jax.configs.small import SIZES, shrink

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.py") if p.name != "__init__.py")


def test_there_are_experiment_files():
    assert len(EXPERIMENTS) >= 1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_experiment_file_validates(path):
    module = load_experiment_module(path)
    assert module.__doc__ and "retro-jax" in module.__doc__, (
        f"{path}: the docstring must hold the exact command to run it")
    load_config(str(path))
    load_config(f"{path}:runlocal", num_devices=8)


@pytest.mark.parametrize("spec", specs())
def test_every_variant_validates(spec):
    """Each size x baseline x runlocal of the paper files, every demo combination, each
    ablation with and without runlocal: loads and validates (CPU runs against 8 devices)."""
    local = "runlocal" in spec.partition(":")[2].split(",")
    config = load_config(str(REPO / spec), num_devices=8 if local else None)
    if local:
        assert config.model.d_model <= 256 and config.train.num_steps <= 1000


def test_docstring_commands_name_existing_variants():
    """Every `experiments/...py[:ARG]` in an experiment docstring loads (no stale names)."""
    seen = 0
    for path in EXPERIMENTS:
        doc = load_experiment_module(path).__doc__
        for spec in sorted(set(re.findall(r"(experiments/[\w/]+\.py(?::[\w.,]+)?)", doc))):
            load_config(str(REPO / spec))
            seen += 1
    assert seen > 40


# ----------------------------------------------------------------- paper files: variants
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_file_sizes_and_baseline(path):
    dataset = path.stem
    assert load_config(str(path)).to_dict() == load_config(f"{path}:172m").to_dict()
    for variant, size in SIZE_VARIANTS.items():
        for baseline in (False, True):
            config = load_config(f"{path}:{variant}" + (",baseline" if baseline else ""))
            tag = variant.replace(".", "_")
            assert config.name == f"{dataset}-{'baseline' if baseline else 'retro'}-{tag}"
            assert config.model.retrieval is not baseline and config.model.size == size
            assert config.model.scan_layers  # compiles flat with depth (docs/model.md)
            for key, value in PAPER_SIZES[size].items():
                assert config.model[key] == value, (variant, key)
            assert config.corpus.kind == dataset and config.corpus_fallback == ""
            assert config.to_dict() == paper_config(size, dataset, retrieval=not baseline
                                                    ).to_dict()
            # The mesh's fixed axes fit the slice the docstring names (v5p-N: N/2 chips).
            chips = int(TPU_SLICE[size].split("-")[1]) // 2
            assert chips % (config.mesh.fsdp * config.mesh.tensor) == 0
            doc = load_experiment_module(path).__doc__
            assert f"{variant} on a {TPU_SLICE[size]} slice" in doc
            # The docstring's table states the mesh, remat, batch and micro-batches that
            # benchmarks/compile_paper.py fitted to the slice.
            row = (f"| {TPU_SLICE[size]} | {config.mesh.fsdp} x {config.mesh.tensor}, "
                   f"{config.model.remat}, {config.train.batch_size} ({config.train.grad_accum})"
                   " |")
            assert any(line.startswith(f"| {variant} |") and row in line
                       for line in doc.splitlines()), (variant, row)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_runlocal_is_one_small_config_at_every_size(path):
    """`:SIZE,runlocal` shrinks every size to the same CPU run; only the labels differ."""
    first = load_config(f"{path}:runlocal", num_devices=8).to_dict()
    for variant in SIZE_VARIANTS:
        config = load_config(f"{path}:{variant},runlocal", num_devices=8).to_dict()
        labels = {"name": config.pop("name")}
        labels["size"] = config["model"].pop("size")
        assert labels["name"].endswith("-on-stdlib")
        expected = {**first, "model": {k: v for k, v in first["model"].items() if k != "size"}}
        expected.pop("name")
        assert config == expected, variant


@pytest.mark.parametrize("arg,expected", [
    ("7.5b,425m", r"2 sizes; give at most one of 172m, 425m, 1\.5b, 7\.5b"),
    ("7.5B", r"unknown variant\(s\) \['7\.5B'\]; allowed: 172m, 425m, 1\.5b, 7\.5b, baseline, "
             "runlocal"),
    ("xl,runlocal", r"unknown variant\(s\) \['xl'\]"),
])
def test_paper_variant_mistakes_name_the_allowed_ones(arg, expected):
    for path in PAPER:
        with pytest.raises(ConfigError, match=expected):
            load_config(f"{path}:{arg}")


# ----------------------------------------------------------------- ablations: same values
ABLATES = {
    "bm25_keys": {"database.retriever"},
    "cca_every3_from1": {"model.cca_layers"}, "cca_every_layer": {"model.cca_layers"},
    "cca_middle_only": {"model.cca_layers"}, "cca_top_only": {"model.cca_layers"},
    "cca_no_relative_positions": {"model.cca_relative_positions"},
    "continuations_only": {"model.neighbour_parts"}, "neighbours_only": {"model.neighbour_parts"},
    "db_size_10pct": {"database.fraction"}, "db_size_1pct": {"database.fraction"},
    "encoder_depth6": {"model.encoder_layers"},
    "neighbours_k1": {"data.num_neighbours"}, "neighbours_k4": {"data.num_neighbours"},
    "no_query_conditioning": {"model.encoder_query_conditioning"},
    "retrieval_off": {"model.retrieval"},
    "retrofit": {"train.retrofit", "train.num_steps"},
}


def _flat(config) -> dict:
    from retro_jax.configs.validate import _flatten

    return _flatten(config)


@pytest.mark.parametrize("arg", ["", ":runlocal"])
def test_ablations_change_only_what_they_ablate(arg):
    """The base is the Pile file's RETRO-172M (plain and runlocal, name aside), and each
    ablation differs from it in exactly its own keys, at both sizes."""
    folder = REPO / "experiments" / "ablations"
    base = _flat(load_config(f"{folder / 'base.py'}{arg}"))
    pile = _flat(load_config(f"{REPO / 'experiments/paper/pile.py'}{arg}"))
    assert {k for k in base if base[k] != pile[k]} == {"name"}
    files = {p.stem for p in folder.glob("*.py")} - {"__init__", "base"}
    assert files == set(ABLATES), "add the new ablation to ABLATES"
    for stem, keys in ABLATES.items():
        config = _flat(load_config(f"{folder / stem}.py{arg}"))
        changed = {k for k in config if config[k] != base[k]}
        assert changed == keys | {"name"}, stem
        assert config["name"].startswith("ablation-")
        assert config["name"].endswith("-on-stdlib") == (arg == ":runlocal")


# ----------------------------------------------------------------- the small-config recipe
def test_shrink_keeps_choices_relative_to_depth():
    config = get_base_config()
    config.model.cca_layers = (6, 9, 12)
    config.eval.num_neighbours = 2
    small = shrink(config, "small")
    assert small.model.num_layers == 4 and small.model.cca_layers == (2, 3, 4)
    assert small.eval.num_neighbours == 2  # a cap: already below 4
    assert small.model.encoder_cross_attend_layers == (1,)
    default = shrink(get_base_config(), "small")
    assert default.model.cca_layers == (2, 4) and default.eval.num_neighbours == 4
    validate_config(default, num_devices=8)
    tiny = shrink(get_base_config(), "tiny", {"model.num_layers": 6, "eval.num_neighbours": 7})
    assert tiny.model.num_layers == 6 and tiny.eval.num_neighbours == 7  # as given
    assert tiny.model.cca_layers == (2,) and tiny.database.chunk_len == 8
    validate_config(tiny)
    with pytest.raises(ValueError, match="expected one of small, tiny"):
        shrink(get_base_config(), "medium")
    with pytest.raises(KeyError, match="model.num_layer'"):
        shrink(get_base_config(), "tiny", {"model.num_layer": 3})
    assert set(SIZES) == {"small", "tiny"}


# ----------------------------------------------------------------- :runlocal's corpus
def test_runlocal_falls_back_to_the_embedded_corpus_only_without_a_path(tmp_path):
    pile = str(REPO / "experiments/paper/pile.py")
    fallback = load_config(f"{pile}:7.5b,baseline,runlocal")
    assert fallback.corpus.kind == "stdlib" and fallback.corpus.path == ""
    assert fallback.name == "pile-baseline-7_5b-on-stdlib"
    given = load_config(f"{pile}:runlocal", [f"corpus.path={tmp_path}"])
    assert given.corpus.kind == "pile" and given.corpus.path == str(tmp_path)
    assert given.name == "pile-retro-172m"
    # No fallback for the full-size runs (a missing path fails when the corpus is opened) or
    # when the command line switches it off.
    assert load_config(pile).corpus.kind == "pile"
    off = load_config(f"{pile}:runlocal", ["corpus_fallback="])
    assert off.corpus.kind == "pile" and off.name == "pile-retro-172m"
    # Resolved once: the saved config reads back unchanged.
    save_config(fallback, tmp_path / "run")
    assert load_saved_config(tmp_path / "run").to_dict() == fallback.to_dict()
    # An ablation names itself after runlocal; the suffix still comes.
    ablation = load_config(f"{REPO / 'experiments/ablations/cca_top_only.py'}:runlocal")
    assert ablation.name == "ablation-cca-top-only-on-stdlib"
    config = get_base_config()
    config.corpus.kind, config.corpus_fallback = "tfds", "stdlib"
    assert validate_config(config).corpus.kind == "tfds"  # tfds reads no path
    with pytest.raises(ConfigError, match="corpus_fallback.*allowed: '', stdlib"):
        load_config(f"{pile}:runlocal", ["corpus_fallback=pile"])


def test_base_config_is_valid():
    validate_config(get_base_config())


def _mistake(key, value, num_devices=None):
    config = get_base_config()
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(ConfigError) as info:
        validate_config(config, num_devices=num_devices, source="experiments/x.py")
    return str(info.value)


def test_unknown_key_names_the_key_and_suggests():
    config = get_base_config()
    config.model.unlock()
    config.model.num_layer = 3
    with pytest.raises(ConfigError, match=r"model\.num_layer.*does not exist"):
        validate_config(config)


def test_unknown_key_in_new_section():
    config = get_base_config()
    config.unlock()
    config.optimiser = {"lr": 1.0}
    with pytest.raises(ConfigError, match=r"optimiser\.lr"):
        validate_config(config)


@pytest.mark.parametrize("key,value,expected", [
    ("model.num_layers", "12", "expected int"),
    ("model.num_layers", 12.0, "expected int"),
    ("train.learning_rate", "1e-4", "expected float"),
    ("model.retrieval", 1, "expected bool"),
    ("model.cca_layers", 6, "expected tuple"),
])
def test_wrong_type(key, value, expected):
    message = _mistake(key, value)
    assert key in message and expected in message and "experiments/x.py" in message


def test_int_accepted_for_float():
    config = get_base_config()
    config.train.learning_rate = 1
    validate_config(config)


@pytest.mark.parametrize("key,value,expected", [
    ("data.seq_len", 1000, "multiple of database.chunk_len=64"),
    ("model.cca_layers", (6, 13), r"\[1, model.num_layers=12\]"),
    ("model.cca_layers", (0,), "1-based"),
    ("model.cca_layers", (6, 6), "must not repeat"),
    ("data.num_neighbours", 0, ">= 1"),
    ("eval.num_neighbours", 0, ">= 1"),
    ("model.activation", "tanh", "allowed: gelu"),
    ("corpus.kind", "web", "allowed: stdlib"),
    ("eval.stride", 100, "multiple of database.chunk_len"),
    ("eval.stride", 4096, "<= data.seq_len"),
    ("train.min_lr_ratio", 1.5, "between 0 and 1"),
    ("train.learning_rate", 0.0, "> 0"),
    ("model.encoder_cross_attend_layers", (3,), "model.encoder_layers=2"),
    ("mesh.fsdp", 0, "positive size or -1"),
    ("mesh.axis_rules", (("batch", "pod"),), "mesh axes are"),
    ("eval.alphas", (0.5, 2.0), "each alpha"),
])
def test_inconsistent_values(key, value, expected):
    message = _mistake(key, value)
    assert key in message
    import re
    assert re.search(expected, message), message


def test_default_cca_empty_for_small_decoder_is_an_error():
    config = get_base_config()
    config.model.num_layers = 4
    with pytest.raises(ConfigError, match="list the CCA layers explicitly"):
        validate_config(config)
    config.model.retrieval = False  # the baseline needs none
    validate_config(config)


def test_batch_must_divide_into_microbatches():
    config = get_base_config()
    config.train.grad_accum = 3
    with pytest.raises(ConfigError, match="train.batch_size"):
        validate_config(config)


def test_mesh_against_device_count():
    config = get_base_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 1
    with pytest.raises(ConfigError, match="4 devices but 8 are available"):
        validate_config(config, num_devices=8)
    config.mesh.data = -1
    validate_config(config, num_devices=8)
    assert mesh_shape(config.mesh, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    config.mesh.fsdp = 3
    with pytest.raises(ConfigError, match="does not divide"):
        validate_config(config, num_devices=8)
    config.mesh.fsdp, config.mesh.tensor = -1, -1
    with pytest.raises(ConfigError, match="only one mesh axis may be -1"):
        validate_config(config)


def test_paper_cca_placement():
    assert default_cca_layers(12) == (6, 9, 12)
    assert default_cca_layers(24) == (9, 12, 15, 18, 21, 24)
    assert default_cca_layers(32)[0] == 9


def test_overrides_are_typed(tmp_path):
    config = load_config(
        str(REPO / "experiments/demo.py"),
        ["train.num_steps=7", "model.cca_layers=(1,3)", "model.retrieval=false",
         "train.learning_rate=1", "name=abc", "model.encoder_cross_attend_layers=1"],
    )
    assert config.train.num_steps == 7
    assert config.model.cca_layers == (1, 3)
    assert config.model.retrieval is False
    assert isinstance(config.train.learning_rate, float)
    assert config.name == "abc"
    assert config.model.encoder_cross_attend_layers == (1,)


@pytest.mark.parametrize("override,expected", [
    ("train.num_step=3", "key does not exist"),
    ("trian.num_steps=3", "not a config section"),
    ("train.num_steps=abc", "not a Python literal"),
    ("model.retrieval=maybe", "expected true or false"),
    ("train.num_steps", "expected --config.KEY=VALUE"),
])
def test_bad_overrides(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(str(REPO / "experiments/demo.py"), [override])


def test_missing_experiment_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("experiments/nope.py")


def test_saved_config_round_trip(tmp_path):
    config = load_config(str(REPO / "experiments/demo.py:quick"))
    save_config(config, tmp_path)
    again = load_saved_config(tmp_path)
    assert again.to_dict() == config.to_dict()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "retro_jax", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_cli_help_lists_every_command():
    from retro_jax.cli import COMMANDS

    out = _cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert name in out.stdout
    for name in COMMANDS:
        sub = _cli(name, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "usage: retro-jax " + name in sub.stdout


def test_cli_reports_config_errors_in_one_line(tmp_path):
    out = _cli("params", "--config", "experiments/demo.py", "--config.model.num_layer=3")
    assert out.returncode == 2
    assert "model.num_layer" in out.stderr and "Traceback" not in out.stderr


# --------------------------------------------- :runlocal builds from --config.corpus.path
_WORDS = [a + b + c for a in ("ka", "lo", "mi", "ne", "ru", "to", "sa", "vi")
          for b in ("de", "po", "li", "an", "er") for c in ("", "s", "ta", "ko")]


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))).capitalize()
                    + " ." for _ in range(sentences))


def write_wikitext_raw(root: Path, articles: int = 30) -> Path:
    """wiki.{train,valid,test}.raw in the real layout: ' = Title = ' articles with
    ' = = Section = = ' subheadings, blank ' ' lines between paragraphs."""
    root.mkdir(parents=True)
    for split, count in (("train", articles), ("valid", 3), ("test", 3)):
        rng = random.Random(split)
        text = " \n"
        for i in range(count):
            text += (f" = {split.title()} article {i} = \n \n {_paragraph(rng, 6)} \n \n"
                     f" = = Section = = \n \n {_paragraph(rng, 6)} \n \n")
        (root / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    return root


def write_pile_jsonl(root: Path, documents: int = 30) -> Path:
    """The Pile's split layout: train/, val/, test/ of JSONL {"text", "meta.pile_set_name"}."""
    for split, count in (("train", documents), ("val", 3), ("test", 3)):
        rng = random.Random(split)
        (root / split).mkdir(parents=True)
        with open(root / split / "00.jsonl", "w", encoding="utf-8") as f:
            for i in range(count):
                record = {"text": _paragraph(rng, 12),
                          "meta": {"pile_set_name": ("Pile-CC", "Github", "ArXiv")[i % 3]}}
                f.write(json.dumps(record) + "\n")
    return root


@pytest.mark.parametrize("dataset", ["wikitext103", "pile"])
def test_runlocal_builds_its_database_from_the_corpus_path(tmp_path, dataset, capsys):
    """`retro-jax build-db --config experiments/paper/D.py:runlocal --config.corpus.path=DIR`
    reads DIR (it used to read the embedded corpus), and `retro-jax report` names the corpus
    kind and path of the row (and a database built from other data than the config says)."""
    from retro_jax.cli import main
    from retro_jax.evaluate.report import build_report

    corpus = (write_wikitext_raw if dataset == "wikitext103" else write_pile_jsonl)(
        tmp_path / "data")
    spec = f"{REPO / 'experiments' / 'paper' / dataset}.py:runlocal"
    overrides = [f"--config.corpus.path={corpus}", "--config.database.retriever=bm25",
                 "--config.tokenizer.vocab_size=330"]
    run = tmp_path / "run"
    assert main(["build-db", "--config", spec, "--workdir", str(run), *overrides]) == 0, (
        capsys.readouterr())
    manifest = json.loads((run / "db" / "manifest.json").read_text())
    assert manifest["corpus"]["kind"] == dataset, manifest["corpus"]
    assert str(corpus) in json.dumps(manifest["corpus"])
    assert manifest["splits"]["train"]["num_chunks"] > 0

    # The report's row names what the run read: config.json's kind and path.
    config = load_config(spec, [o.removeprefix("--config.") for o in overrides])
    save_config(config, run)
    record = {"format": 1, "name": config.name, "mode": "on", "split": "validation",
              "corpus": config.corpus.kind, "metric": "bpb", "value": 1.0,
              "overall": {"bits_per_byte": 1.0}}
    (run / "eval").mkdir()
    (run / "eval" / "validation-on.json").write_text(json.dumps(record))
    row = next(line for line in build_report([run]).splitlines()
               if line.startswith(f"| {dataset}-retro-172m (RETRO)"))
    assert f"| {dataset} {corpus} |" in row
    # A run whose config says the embedded corpus but whose database holds the data set.
    save_config(load_config(spec), run)
    row = next(line for line in build_report([run]).splitlines()
               if line.startswith(f"| {dataset}-retro-172m (RETRO)"))
    assert (f"| stdlib (embedded) [evaluated with corpus.kind={dataset}; database built from "
            f"{dataset}] |") in row
