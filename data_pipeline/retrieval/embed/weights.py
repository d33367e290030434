"""Loads Hugging Face BERT safetensors into `BertEncoder`, one explicitly mapped name at a time.

Accepted files: `model.safetensors`, or every `*.safetensors` in the directory (sharded
checkpoints), with names either bare (`embeddings.word_embeddings.weight`, as `BertModel`
saves them) or under a `bert.` prefix (as `BertForMaskedLM` & co. save them). Names the
encoder knows and does not use (the pooler, `position_ids`, the pre-training heads `cls.*`)
are skipped; any other name, and any name the encoder needs and does not find, fails with a
DataError listing them.

torch `nn.Linear` stores `weight` as [out, in]; `nnx.Linear.kernel` is [in, out], so every
matrix is transposed. Query, key and value are concatenated into the fused `qkv` kernel
[D, 3D] in that order. The encoder's layers are stacked: `layers.qkv.kernel` is [N, D, 3D],
layer i's weights at index i.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from data_pipeline.errors import DataError
from data_pipeline.retrieval.embed.bert import BertConfig, BertEncoder

# Names a BERT checkpoint may hold that the encoder has no use for.
_UNUSED_NAMES = ("pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids")
_UNUSED_PREFIXES = ("cls.",)  # BertForPreTraining / BertForMaskedLM heads

Getter = Callable[[dict[str, np.ndarray]], np.ndarray]


def safetensors_files(model_dir: Path) -> list[Path]:
    """`model.safetensors` if present, else every `*.safetensors` (sorted); DataError if none."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise DataError(
            f"{model_dir}: no model.safetensors (nor any *.safetensors); the BERT embedder "
            "reads safetensors weights only (convert a pytorch_model.bin with "
            "`safetensors.torch.save_file` elsewhere)"
        )
    return files


def read_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    """All tensors of the files as float32 numpy arrays, `bert.` prefix removed."""
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for file in files:
        # framework="flax" reads bfloat16/float16 checkpoints too (numpy has no bfloat16).
        with safe_open(str(file), framework="flax") as handle:
            for raw_name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = raw_name.removeprefix("bert.")
                if name in tensors:
                    raise DataError(
                        f"weight {name!r} appears twice: in {origin[name]} and {file}"
                    )
                origin[name] = file
                if name in _UNUSED_NAMES or name.startswith(_UNUSED_PREFIXES):
                    tensors[name] = np.zeros(0, np.float32)  # present, never read
                    continue
                tensors[name] = np.asarray(handle.get_tensor(raw_name), dtype=np.float32)
    return tensors


def _layer_weights(i: int) -> dict[tuple[str, str], tuple[list[str], Getter]]:
    """Layer i: (BertLayer submodule, parameter) -> (Hugging Face names, how to make it)."""
    p = f"encoder.layer.{i}."
    qkv = [p + f"attention.self.{part}" for part in ("query", "key", "value")]
    table: dict[tuple[str, str], tuple[list[str], Getter]] = {
        ("qkv", "kernel"): (
            [n + ".weight" for n in qkv],
            lambda w: np.concatenate([w[n + ".weight"].T for n in qkv], axis=1),
        ),
        ("qkv", "bias"): (
            [n + ".bias" for n in qkv],
            lambda w: np.concatenate([w[n + ".bias"] for n in qkv]),
        ),
    }
    for sub, hf in (
        ("attention_out", "attention.output.dense"),
        ("intermediate", "intermediate.dense"),
        ("output", "output.dense"),
    ):
        name = p + hf
        table[sub, "kernel"] = ([name + ".weight"], lambda w, n=name: w[n + ".weight"].T)
        table[sub, "bias"] = ([name + ".bias"], lambda w, n=name: w[n + ".bias"])
    for sub, hf in (
        ("attention_norm", "attention.output.LayerNorm"),
        ("output_norm", "output.LayerNorm"),
    ):
        name = p + hf
        table[sub, "scale"] = ([name + ".weight"], lambda w, n=name: w[n + ".weight"])
        table[sub, "bias"] = ([name + ".bias"], lambda w, n=name: w[n + ".bias"])
    return table


def _weight_table(cfg: BertConfig, model: BertEncoder) -> list[tuple[nnx.Param, list[str], Getter]]:
    """(target parameter, the Hugging Face names it is made of, how to make it)."""
    same = lambda name: (lambda w: w[name])
    e = "embeddings."
    table: list[tuple[nnx.Param, list[str], Getter]] = [
        (model.word_embeddings.embedding, [e + "word_embeddings.weight"],
         same(e + "word_embeddings.weight")),
        (model.position_embeddings.embedding, [e + "position_embeddings.weight"],
         same(e + "position_embeddings.weight")),
        (model.token_type_embeddings.embedding, [e + "token_type_embeddings.weight"],
         same(e + "token_type_embeddings.weight")),
        (model.embedding_norm.scale, [e + "LayerNorm.weight"], same(e + "LayerNorm.weight")),
        (model.embedding_norm.bias, [e + "LayerNorm.bias"], same(e + "LayerNorm.bias")),
    ]
    # Stacked layers: parameter [N, ...] = layer 0's, layer 1's, ... along the first axis.
    per_layer = [_layer_weights(i) for i in range(cfg.num_hidden_layers)]
    for sub, attr in per_layer[0]:
        param = getattr(getattr(model.layers, sub), attr)
        names = [name for layer in per_layer for name in layer[sub, attr][0]]
        getters = [layer[sub, attr][1] for layer in per_layer]
        table.append((param, names, lambda w, g=getters: np.stack([get(w) for get in g])))
    return table


def load_bert(model_dir: Path, cfg: BertConfig, *, dtype: jnp.dtype = jnp.float32) -> BertEncoder:
    """A `BertEncoder` holding the directory's weights (float32 parameters).

    DataError lists missing names (the encoder needs them, the files lack them), unexpected
    names (the files hold them, the encoder does not know them) and shape mismatches.
    """
    model_dir = Path(model_dir)
    files = safetensors_files(model_dir)
    tensors = read_tensors(files)
    # Abstract module: parameters are shapes only, so no random initialisation is computed.
    model = nnx.eval_shape(lambda: BertEncoder(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    table = _weight_table(cfg, model)

    wanted = {name for _, names, _ in table for name in names}
    missing = sorted(wanted - tensors.keys())
    unexpected = sorted(
        name for name in tensors.keys() - wanted
        if name not in _UNUSED_NAMES and not name.startswith(_UNUSED_PREFIXES)
    )
    if missing or unexpected:
        shown = lambda names: ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
        raise DataError(
            f"{', '.join(str(f) for f in files)}: weights do not match a BERT with "
            f"{cfg.num_hidden_layers} layers (config.json). "
            f"Missing ({len(missing)}): [{shown(missing)}]. "
            f"Unexpected ({len(unexpected)}): [{shown(unexpected)}]. "
            "Expected Hugging Face BertModel names, optionally prefixed 'bert.'"
        )

    for param, names, getter in table:
        value = getter(tensors)
        if value.shape != param.shape:
            what = repr(names[0]) + (f" (+{len(names) - 1} fused/stacked)" if names[1:] else "")
            raise DataError(
                f"{model_dir}: weight {what} has shape {value.shape} after mapping; the "
                f"config.json model needs {param.shape}"
            )
        param.set_value(jax.device_put(value))
    return model
