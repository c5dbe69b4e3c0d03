"""What a GRPO / DPO run needs before its loop starts: model, weights, tokenizer, prompts.

- `RLConfig`: the config fields GRPO and DPO share (the training module, the
  weight file, the model, its tokenizer), on the shared RunConfig base.
- The model is a preset of exporters/qwen2.py or a local HF directory of a
  Qwen2-family model (+ optional overrides for toy shapes).
- Artifact paths in a config are build-graph outputs (runtime/run/artifacts.py).
- The weight file is the reference design's flat binary (runtime reads it
  with exporters/hf_weights.read_flat, size checked against meta.json). When
  missing it is exported from the model's HF weights (safetensors), or, with
  init_weights "random", written from a seeded random initialisation.
- Tokenizers: "qwen" (the model's tokenizer.json), a HF directory, or
  "bytes" (UTF-8 bytes as ids, id 0 as EOS: toy models with vocab 256).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pcpc.config import check_choice
from pcpc.errors import UserError
from pcpc.exporters.peft import PeftConfig
from pcpc.runtime.rl.datasets import DatasetSection
from pcpc.runtime.run.config import RunConfig

INIT_WEIGHTS = ("hf", "random")

REFERENCE_PROMPTS = (
    "2+2=",
    "The capital of France is",
    "Write a python function to add two numbers.",
    "Is fire hot? Answer yes or no.",
    "Solve 3 * 4 + 2.",
)
"""The reference design's test prompts, written to prompt_file when it does not exist."""


@dataclass(frozen=True, kw_only=True)
class RLConfig(RunConfig):
    """What a run of a Qwen2-family model through a compiled training module takes (GRPO, DPO)."""

    training_model_path: str
    """Training module artifact (.vmfb): log-probs, the loss and its gradients (derived by pcpc.autodiff),
    the chunked AdamW (and outer step); built there when missing or stale (runtime/run/artifacts.py)."""
    weights_path: str
    """Flat fp32 weight file of the initial policy (parameter order of meta.json, no header); exported from
    the model's HF weights when missing (or initialised at random with init_weights "random")."""
    tokenizer: str = "qwen"
    """qwen (the model's HF tokenizer), bytes (UTF-8 bytes as ids, id 0 is EOS; for toy models), or the
    path of a HF tokenizer directory; prompts get the chat template."""
    model: str = "qwen2.5-0.5b"
    """Architecture: a preset of exporters/qwen2.py, or a local HF directory of a Qwen2-family model."""
    model_overrides: dict = field(default_factory=dict)
    """Qwen2Config fields applied on top of the preset (toy models)."""
    init_weights: str = "hf"
    """How weights_path is made when missing: hf (export the model's HF weights) or random (seeded init)."""
    eos_token_ids: tuple[int, ...] | None = None
    """Token ids that end a completion (null: the tokenizer's EOS and the chat end-of-turn token)."""
    peft: PeftConfig | None = None
    """Train an adapter on the frozen base instead of every weight (exporters/peft.py: type lora, lora_plus,
    dora, pissa, milora, vera or miss; r, lora_alpha, target_modules, ... as HF peft names them). The run
    saves it as adapter_model.safetensors + adapter_config.json in <run dir>/adapter, which peft loads."""

    dataset: DatasetSection | None = None
    """GRPO prompts or DPO pairs from a Hugging Face `datasets` dataset (Hub name or local directory, parquet,
    JSONL or CSV file) instead of grpo_config.prompt_file / dpo_config.data_path: name | path, subset, split,
    columns, prompt_template, num_samples, seed, shuffle, chat_template (see DatasetSection)."""

    mask: str | None = None
    """Sparse fine-tuning: a mask file (`pcpc masks find`); only its weights are trained, by the compiled
    sparse AdamW step with compact moments (runtime/rl/sparse.py), every other weight stays bit-identical."""

    compute_dtype: str = "float32"
    """The training module's matmuls (projections and LM head, forward and backward, and the reference's):
    float32, or bfloat16 (mixed precision as torch's CPU autocast: bf16 operands and products, fp32
    accumulation; weights, optimizer state, norms, softmax and the loss stay fp32). For CPUs with avx512_bf16
    (its build warns on others, where IREE emulates bf16 far slower); full fine-tuning only."""

    RESUME_MAY_CHANGE = RunConfig.RESUME_MAY_CHANGE + ("training_model_path", "init_weights")
    """Where the module is built and how a missing weight file would be made do not change a resumed run."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("training_model_path", "weights_path", "tokenizer", "model"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if Path(self.training_model_path).suffix != ".vmfb":
            raise ValueError(f"training_model_path must name a .vmfb build artifact (e.g. "
                             f"models/qwen_grpo_training.vmfb), got {self.training_model_path!r}")
        check_choice(self, "init_weights", INIT_WEIGHTS)
        if self.mask is not None and self.peft is not None:
            raise ValueError("mask and peft: a run trains either the masked weights or an adapter, not both")
        if self.mask is not None and not self.mask:
            raise ValueError("mask must not be empty (a mask file, or null)")
        from pcpc.exporters.precision import COMPUTE_DTYPES

        check_choice(self, "compute_dtype", tuple(COMPUTE_DTYPES))
        if self.compute_dtype != "float32" and self.peft is not None:
            raise ValueError(f"compute_dtype {self.compute_dtype}: an adapter's training module computes in "
                             f"float32; drop compute_dtype or peft")


@dataclass(frozen=True)
class ModelSource:
    """Where the architecture (and the HF weights, if any) come from."""

    recipe: dict
    """{"model": preset} or {"hf_config": config.json}, plus model_overrides: the recipe keys of a target."""
    model: str
    """The config's `model` value (preset name or directory)."""

    @property
    def config(self):
        from pcpc.mlir.qwen_functions import model_config

        return model_config(self.recipe)


def model_source(model: str, overrides: dict | None = None, where: str = "model") -> ModelSource:
    from pcpc.exporters import qwen2
    from pcpc.exporters.hf_weights import read_hf_config

    path = Path(model)
    if path.is_dir():
        hf = read_hf_config(path)
        qwen2.config_from_hf(hf, where=str(path / "config.json"))  # fail early on a foreign architecture
        recipe = {"hf_config": hf}
    elif model in qwen2.PRESETS:
        recipe = {"model": model}
    else:
        raise UserError(f"{where}: {model!r} is neither a directory nor a Qwen2 preset; valid presets: "
                        f"{', '.join(qwen2.PRESETS)}")
    if overrides:
        recipe["model_overrides"] = dict(overrides)
    src = ModelSource(recipe, model)
    try:
        src.config
    except ValueError as e:
        raise UserError(f"model_overrides: {e}") from None
    return src


# ---------------------------------------------------------------------------
# weights


def check_mask(cfg: RLConfig) -> None:
    if cfg.mask is not None and not Path(cfg.mask).is_file():
        raise UserError(f"mask: {cfg.mask} not found (relative to {Path.cwd()}); make one with `pcpc masks find`")


def check_weights_source(path: str | Path, src: ModelSource, init_weights: str) -> None:
    """Fail fast, naming what to download and where, when the weight file is missing and cannot be exported."""
    from pcpc.exporters import hf_weights

    path = Path(path)
    if path.exists() or init_weights == "random":
        return
    try:
        hf_weights.find_model_dir(src.model, option="model")
    except UserError as e:
        repo = hf_weights.HUB_REPOS.get(src.model)
        if repo is None:  # a directory without weights: its own message says what is missing
            raise UserError(f"weights_path: {path} does not exist and cannot be exported: {e}") from None
        raise UserError(
            f"weights_path: {path} does not exist, so pcpc exports it from the HF weights of {src.model}, which are "
            f"not here. Download {repo} (config.json, generation_config.json, model.safetensors, tokenizer.json, "
            f"tokenizer_config.json) into the HF cache with `huggingface-cli download {repo}` (it lands in "
            f"{hf_weights.hub_cache_dirs()[0]}), or into a directory DIR and set \"model\": \"DIR\" in the config; "
            f"then run again and {path} is written. (\"init_weights\": \"random\" starts from random weights "
            f"instead.)") from None


def ensure_weights(path: str | Path, src: ModelSource, meta, init_weights: str, seed: int,
                   say: Callable[[str], None]) -> Path:
    """Make the flat weight file if it is missing; always check its size against meta.json (the base model's
    weights of a training module that trains an adapter)."""
    from pcpc.exporters import hf_weights, qwen2
    from pcpc.runtime.module import base_bytes

    path = Path(path)
    if not path.exists():
        cfg = src.config
        shapes = qwen2.param_shapes(cfg)
        if init_weights == "random":
            say(f"weights_path: {path} missing; writing a seeded random initialisation (seed {seed})")
            tensors = [(k, v.numpy()) for k, v in qwen2.init_params(cfg, seed).items()]
        else:
            check_weights_source(path, src, init_weights)
            model_dir = hf_weights.find_model_dir(src.model, option="model")
            found = qwen2.config_from_hf(hf_weights.read_hf_config(model_dir), where=str(model_dir / "config.json"))
            if found != cfg:
                raise UserError(f"{model_dir}: config.json describes a different model than {src.model!r}")
            say(f"weights_path: {path} missing; exporting it from {model_dir}")
            tensors = hf_weights.ordered_tensors(hf_weights.read_safetensors(model_dir), shapes,
                                                 cfg.tie_word_embeddings, str(model_dir))
        size = hf_weights.write_flat(path, list(tensors), "float32", base_bytes(meta))
        say(f"  wrote {path} ({size:,} bytes, {len(shapes)} tensors)")
    hf_weights.verify_flat(path, base_bytes(meta))
    return path


def module_recipe(cfg: RLConfig, functions: Sequence[str]) -> dict:
    """The training module's recipe keys that come from the run's config: its `functions`; with an adapter, its
    `peft` section and merge functions; without one, its `compute_dtype` where that is not float32."""
    if cfg.peft is None:
        return {"functions": list(functions),
                **({"compute_dtype": cfg.compute_dtype} if cfg.compute_dtype != "float32" else {})}
    from pcpc.exporters.peft import module_section

    return {"functions": [*functions, "merge"], "peft": module_section(cfg.peft)}


def describe_training(cfg: RLConfig, meta) -> str:
    """`494,032,768 params` (`..., bf16 matmuls` with compute_dtype bfloat16) or `494,032,768 params frozen,
    lora r 16: 8,798,208 trained (1.78%)`."""
    from pcpc.runtime.module import base_bytes

    base = base_bytes(meta) // 4
    if cfg.peft is None:
        return f"{base:,} params" + (", bf16 matmuls" if cfg.compute_dtype == "bfloat16" else "")
    trained = meta.parameter_bytes // 4
    return (f"{base:,} params frozen, {cfg.peft.type} r {cfg.peft.r}: {trained:,} trained "
            f"({100 * trained / base:.2f}%)")


def vocab_size(meta) -> int:
    """Rows of the embedding, the first base weight of a training module."""
    from pcpc.runtime.module import base_specs

    return base_specs(meta)[0].shape[0]


def read_weights(path: str | Path, meta) -> list[np.ndarray]:
    """The flat weight file as one fp32 array per base-model weight, in meta.json order."""
    from pcpc.exporters.hf_weights import read_flat
    from pcpc.runtime.module import base_specs

    specs = base_specs(meta)
    return read_flat(Path(path), specs, sum(s.nbytes for s in specs))


# ---------------------------------------------------------------------------
# tokenizers and prompts


class ByteTokenizer:
    """UTF-8 bytes as token ids; id 0 (NUL, never in text) ends a completion. For toy models (vocab 256)."""

    name = "bytes"
    eos_token_ids = (0,)

    def encode(self, text: str, chat: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A HF tokenizer directory (runtime/prompts.TextCodec) with its EOS ids."""

    def __init__(self, model_dir: Path):
        from pcpc.exporters.hf_weights import eos_token_ids
        from pcpc.runtime.prompts import TextCodec

        self.name = str(model_dir)
        self.codec = TextCodec(model_dir)
        eos = list(eos_token_ids(model_dir))
        for special in ("eos_token", "pad_token"):
            tok = self.codec.special(special)
            tid = self.codec.tokenizer.token_to_id(tok) if tok else None
            if special == "eos_token" and tid is not None and tid not in eos:
                eos.append(tid)
        self.eos_token_ids = tuple(eos)

    def encode(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of `text`; chat=True wraps it in the chat template as a user turn (prompts)."""
        return self.codec.encode(text, chat=chat)

    def decode(self, ids: Sequence[int]) -> str:
        return self.codec.decode(ids)


def load_tokenizer(spec: str, model: str, eos_override: Sequence[int] | None = None):
    """"bytes", "qwen" (the tokenizer of `model`) or a HF directory; eos_override replaces the EOS ids."""
    from pcpc.exporters.hf_weights import HUB_REPOS, find_in_hub_cache, hub_cache_dirs

    if spec == "bytes":
        tok = ByteTokenizer()
    else:
        if spec == "qwen":
            path = Path(model) if Path(model).is_dir() else None
            if path is None:
                repo = HUB_REPOS.get(model, HUB_REPOS["qwen2.5-0.5b"])
                path = find_in_hub_cache(repo)
                if path is None:
                    raise UserError(
                        f"tokenizer: \"qwen\" needs the tokenizer files of {repo} (tokenizer.json, "
                        f"tokenizer_config.json): download them, e.g. `huggingface-cli download {repo}` into the HF "
                        f"cache ({hub_cache_dirs()[-1]}), or set \"model\" / \"tokenizer\" to a local HF directory")
        else:
            path = Path(spec)
            if not path.is_dir():
                raise UserError(f"tokenizer: {spec!r} is not \"qwen\", \"bytes\" or a HF tokenizer directory")
        tok = HFTokenizer(path)
    if eos_override is not None:
        tok.eos_token_ids = tuple(int(e) for e in eos_override)
    if not tok.eos_token_ids:
        raise UserError(f"tokenizer {tok.name}: no EOS token id known; set eos_token_ids in the config")
    return tok


def ensure_prompts(path: str | Path, tokenizer, vocab_size: int, say: Callable[[str], None]) -> list[list[int]]:
    """The prompt file's token ids, written from the reference's test prompts first if the file is missing."""
    from pcpc.runtime.prompts import read_prompts, write_prompts

    path = Path(path)
    if not path.exists():
        ids = [tokenizer.encode(t) for t in REFERENCE_PROMPTS]
        write_prompts(path, ids)
        say(f"prompt_file: {path} missing; wrote the reference's {len(ids)} test prompts with the {tokenizer.name} "
            f"tokenizer (make your own with `pcpc data prompts encode`)")
    prompts = read_prompts(path)
    check_prompts(prompts, vocab_size, f"prompt_file: {path}", "was it written with another tokenizer?")
    return prompts


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, where: str, hint: str) -> None:
    """At least one prompt, none empty, every token id inside the model's vocabulary."""
    if not prompts:
        raise UserError(f"{where} holds no prompts")
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"{where}: prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise UserError(f"{where}: prompt {i} has token id {bad[0]} outside the model's vocabulary "
                            f"(0..{vocab_size - 1}); {hint}")
