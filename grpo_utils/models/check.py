"""What a model path names, checked without loading it: ``config.json`` parses and names a
``model_type`` transformers knows as a causal LM, the weights are there (a safetensors file or an
index of them) with headers that parse, lengths that match and shapes that fit the config, and
the tokenizer files are present. A hub name that is not in the local Hugging Face cache fails at
once when the hub cannot be reached (``from_pretrained`` would retry for about a minute).

One :func:`check_model_name` serves ``model.name``, ``ref_model.path`` and a checkpoint to resume
from (:func:`check_same_architecture`); each problem is one line naming the key and the file.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from grpo_utils.errors import ConfigError
from grpo_utils.models.loading import BUILTIN_PREFIX

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
# config.json keys that fix a model's tensor shapes: a checkpoint must agree with the model on them.
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
              "num_attention_heads", "num_key_value_heads")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header


@dataclass
class ModelInfo:
    """A model's ``config.json`` (and where it was read), for checks against the config."""

    path: Path | None
    config: dict[str, Any] = field(default_factory=dict)

    def get(self, *names: str) -> Any:
        for name in names:
            value = self.config.get(name)
            if value is None and isinstance(self.config.get("text_config"), dict):
                value = self.config["text_config"].get(name)
            if value is not None:
                return value
        return None

    @property
    def context(self) -> int | None:
        """Positions the model has (its longest prompt + completion), if config.json says."""
        return self.get("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")

    @property
    def hidden_size(self) -> int | None:
        return self.get("hidden_size", "n_embd", "d_model")

    @property
    def vocab_size(self) -> int | None:
        return self.get("vocab_size")


def check_model_name(name: str, key: str = "model.name", tokenizer: bool = True) -> ModelInfo | None:
    """``name`` as ``key`` gives it: a local model directory (checked by :func:`check_model_dir`),
    a hub name found in the local cache (checked the same way) or reachable on the hub, or
    ``builtin:quickstart``. Raises :class:`ConfigError` (one line); returns what config.json says
    (None where nothing can be read without downloading or building)."""
    if name.startswith(BUILTIN_PREFIX):
        from grpo_utils.models.quickstart import quickstart_model_dir

        built = quickstart_model_dir()
        return check_model_dir(built, key, name, tokenizer) if (built / "config.json").is_file() else None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}={name} is a directory without config.json; expected a Hugging Face model "
                              "directory (e.g. a run's final_model/ or checkpoints/step_<N>/) or a hub name org/name")
        return check_model_dir(path, key, name, tokenizer)
    if path.exists():
        raise ConfigError(f"{key}={name} is a file; expected a model directory or a hub name org/name")
    looks_local = (name.startswith(("/", "./", "../", "~")) or name in (".", "..")
                   or name.count(os.sep) > 1 or (os.altsep is not None and os.altsep in name))
    if looks_local:
        raise ConfigError(f"{key}={name}: no such directory; expected a local model directory or a hub name org/name")
    return _check_hub_name(name, key, tokenizer)


def check_model_dir(path: Path, key: str, name: str, tokenizer: bool = True) -> ModelInfo:
    """The checks of a local model directory (see the module doc); nothing is loaded."""
    where = f"{key}={name}"
    config = _read_json(path / "config.json", where)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ConfigError(f"{where}: {path / 'config.json'} has no model_type; expected a Hugging Face config "
                          "(e.g. \"model_type\": \"qwen2\")")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise ConfigError(f"{where}: config.json's model_type={model_type!r} is unknown to the installed transformers "
                          "(its AutoConfig); expected a known type such as qwen2 or llama, or a newer transformers")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"{where}: model_type={model_type!r} has no causal language model class in transformers "
                          "(AutoModelForCausalLM); expected a text generation model")
    info = ModelInfo(path, config)
    _check_weights(path, where, info)
    if tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{where}: no tokenizer files in {path} (expected one of {', '.join(TOKENIZER_FILES)}; "
                          "save the tokenizer with the model: tokenizer.save_pretrained(dir))")
    if tokenizer and (path / "tokenizer_config.json").is_file():
        _read_json(path / "tokenizer_config.json", where)
    return info


def check_same_architecture(checkpoint: Path, model: ModelInfo | None, key: str, shown: str) -> None:
    """A checkpoint to resume from has the shapes of ``model`` (its config.json's :data:`SHAPE_KEYS`),
    so loading its weights cannot fail half-way with a state-dict mismatch."""
    ckpt = check_model_dir(Path(checkpoint), key, shown, tokenizer=False)
    if model is None:
        return
    for name in SHAPE_KEYS:
        theirs, ours = ckpt.config.get(name), model.config.get(name)
        if theirs is not None and ours is not None and theirs != ours:
            raise ConfigError(f"{key}: checkpoint {shown} is of another model ({name}={theirs} in its config.json, "
                              f"{name}={ours} in model.name's); resume with the model it was trained from")


def _read_json(path: Path, where: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read {path} ({type(e).__name__})") from None
    if not text.strip():
        raise ConfigError(f"{where}: {path} is empty; expected a JSON object")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {path} is a JSON {type(data).__name__}, expected an object")
    return data


def _check_weights(path: Path, where: str, info: ModelInfo) -> None:
    present = [f for f in WEIGHT_FILES if (path / f).is_file()]
    if not present:
        raise ConfigError(f"{where}: no weights in {path} (expected {' or '.join(WEIGHT_FILES[:2])}, or "
                          f"{' or '.join(WEIGHT_FILES[2:])})")
    shapes: dict[str, list[int]] = {}
    if "model.safetensors" in present:
        shapes.update(safetensors_shapes(path / "model.safetensors", where))
    elif "model.safetensors.index.json" in present:
        index = _read_json(path / "model.safetensors.index.json", where)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{where}: {path / 'model.safetensors.index.json'} has no weight_map")
        for shard in sorted(set(weight_map.values())):
            if not (path / str(shard)).is_file():
                raise ConfigError(f"{where}: {path / str(shard)} is missing (listed in model.safetensors.index.json)")
            shapes.update(safetensors_shapes(path / str(shard), where))
    else:
        weights = path / present[0]
        if weights.stat().st_size == 0:
            raise ConfigError(f"{where}: {weights} is empty")
        return  # a pickle's shapes cannot be read without loading it
    _check_shapes(shapes, where, info)


def safetensors_shapes(path: Path, where: str) -> dict[str, list[int]]:
    """``{tensor: shape}`` from a safetensors file's header, checking that the file holds every
    byte the header promises (a truncated download or copy fails here, not inside the loader)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit the file's {size} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        shapes = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("shape"), list):
                raise ValueError(f"tensor {name} has no shape")
            shapes[name] = entry["shape"]
            end = max(end, int(entry.get("data_offsets", [0, 0])[1]))
    except (ValueError, TypeError, IndexError, struct.error) as e:
        raise ConfigError(f"{where}: {path} is not a readable safetensors file ({e})") from None
    if 8 + length + end > size:
        raise ConfigError(f"{where}: {path} is truncated: its header lists {8 + length + end} bytes, the file has "
                          f"{size}")
    return shapes


def _check_shapes(shapes: dict[str, list[int]], where: str, info: ModelInfo) -> None:
    """The embedding is vocab_size x hidden_size and there are num_hidden_layers layers, as
    config.json says: weights saved from another model fail here, not in ``load_state_dict``."""
    vocab, hidden = info.vocab_size, info.hidden_size
    for name, shape in shapes.items():
        if name.endswith(_EMBEDDINGS) and vocab and hidden:
            if list(shape) != [vocab, hidden]:
                raise ConfigError(f"{where}: weight {name} has shape {list(shape)} but config.json says "
                                  f"vocab_size={vocab}, hidden_size={hidden}; the weights are of another model")
            break
    layers = info.get("num_hidden_layers", "n_layer")
    found = {int(m.group(1)) for name in shapes if (m := _LAYER.search(name))}
    if layers and found and max(found) + 1 != layers:
        raise ConfigError(f"{where}: the weights have {max(found) + 1} layers but config.json says "
                          f"num_hidden_layers={layers}; the weights are of another model")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _check_hub_name(name: str, key: str, tokenizer: bool) -> ModelInfo | None:
    """A hub name: from the local cache when it is there (checked as a directory); otherwise the
    hub must be reachable now, and then must have the model."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid repo id
        raise ConfigError(f"{key}={name}: not a local directory, nor a hub name org/name") from None
    if isinstance(cached, str):
        return check_model_dir(Path(cached).parent, key, name, tokenizer)
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        raise ConfigError(f"{key}={name}: no such local directory, and not in the Hugging Face cache (offline mode, "
                          "HF_HUB_OFFLINE=1: nothing is downloaded); expected a local model directory or a cached "
                          "hub model")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        raise ConfigError(f"{key}={name}: no such local directory, not in the Hugging Face cache, and the hub "
                          f"({endpoint}) cannot be reached ({e.strerror or type(e).__name__}); expected a local "
                          "model directory, or download it first") from None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi(endpoint=endpoint).model_info(name, timeout=10)
    except GatedRepoError:
        raise ConfigError(f"{key}={name} is a gated model: accept its terms on the hub and log in "
                          "(huggingface-cli login)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}={name}: no such model on the Hugging Face hub (or it is private: log in); "
                          "expected org/name of an existing model, or a local directory") from None
    except Exception:  # the hub answered something else (rate limit, outage): from_pretrained will say
        return None
    return None
