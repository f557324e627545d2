"""Typed config schema: every default is stated here, once.

Every config group under ``conf/`` is merged onto these dataclasses (registered in Hydra's
ConfigStore as ``schema``); the yaml files only hold what a preset changes. An unknown key or
a value of the wrong type fails at composition time, before any compute, as a one-line
``ConfigError`` naming the key (``compose``); ``validate`` checks enumerations, ranges and
combinations.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import ConfigError
from .adapters.lora import ADAPTERS, TARGETS
from .adapters.nf4 import BLOCK_SIZE, SCALER_BLOCK_SIZE
from .model.args import ATTN_IMPLS, HEADS, ROPE_IMPLS, ModelArgs

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _register_resolvers() -> None:
    # `${project_root:}` lets defaults point at ../shared independent of the working directory.
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("required"):
        # `${required:data.train_path,what it is}`: a preset's value the user must give (a plain
        # `???` would not replace the value an earlier config group set).
        OmegaConf.register_new_resolver("required", _required)


def _required(key: str, what: str = "") -> str:
    raise ConfigError(f"config key '{key}' must be set by this preset's user: {key}=...{f' ({what})' if what else ''}")


@dataclass
class AdapterConfig:
    """Config group model/adapter: none (full fine-tuning) | lora | qlora (LoRA over an NF4 base)."""

    name: str = "none"
    rank: int = 16
    alpha: Optional[float] = None  # null = 2 x rank
    dropout: float = 0.05
    # PEFT's module names; default every decoder linear.
    target_modules: list[str] = field(default_factory=lambda: list(TARGETS))
    use_rslora: bool = False  # scaling alpha / sqrt(rank) instead of alpha / rank
    # qlora: weights per absmax scale, and scales per double-quantisation block (QLoRA's 64 / 256).
    nf4_block_size: int = BLOCK_SIZE
    nf4_scaler_block_size: int = SCALER_BLOCK_SIZE


@dataclass
class ModelConfig(ModelArgs):
    """ModelArgs (architecture, head, kernels; defaults = gemma-2-2b) plus where weights come from."""

    name: str = MISSING
    # Path to a transformers Gemma 2 directory; null trains from scratch (architecture from here).
    # Loading a checkpoint takes the architecture from its config.json, except:
    name_or_path: Optional[str] = None
    # Forced onto loaded checkpoints too when set (the 9B release changed it 224 -> 256);
    # null keeps the checkpoint's value.
    query_pre_attn_scalar: Optional[int] = 256
    # Storage dtype of the weights. bfloat16 + AnyPrecisionAdamW(Kahan) = no fp32 master copy.
    dtype: str = "float32"
    # Classes of the head: null follows the task (3 for Arena, the class count otherwise).
    num_labels: Optional[int] = None
    # parallelize: checkpoint each decoder layer's activations; torch.compile each layer's forward
    # (dynamic shapes; on CPU it only proves the compiled graph gives the eager numbers).
    activation_checkpointing: bool = False
    compile: bool = False
    # torch.compile backend: inductor (the fast one); aot_eager traces the same graphs (dynamo +
    # AOTAutograd, graph breaks, guards) without generating kernels, for cheap CPU checks.
    compile_backend: str = "inductor"
    adapter: AdapterConfig = field(default_factory=AdapterConfig)


@dataclass
class DataConfig:
    task: str = "arena"  # arena | text_classification (config group data/task)
    train_path: str = MISSING  # CSV / parquet / JSONL; data/task=arena points at the shared fixtures
    eval_path: Optional[str] = None
    test_path: Optional[str] = None
    tokenizer_path: str = "${project_root:}/../shared/fixtures/gemma2-tokenizer"
    max_length: int = 4096
    max_tokens: int = 16384  # token budget of one packed micro-batch on one rank
    global_batch_rows: int = 80  # rows per optimizer step over all ranks
    eval_max_tokens: Optional[int] = None  # defaults to max_tokens
    on_bad_row: str = "error"  # error | skip
    # No eval file: hold out this seeded, label-stratified share of the training file (0.2 = 80/20).
    eval_fraction: Optional[float] = None
    prompt_layout: str = "interleaved"  # arena: interleaved | sequential
    # arena A/B swap augmentation: none | double (each row and its swapped twin, shuffled
    # independently: the epoch is twice as long) | full (as double, but each row and its twin in
    # the same optimizer step). true / false are aliases of double / none.
    swap_ab: Any = "none"
    text_column: str = "text"  # text_classification: the text to classify
    label_column: str = "label"  # text_classification: class name or integer per row
    class_names: Optional[list[str]] = None  # text_classification: null = sorted labels of the training file
    shuffle: bool = True
    limit_train_rows: Optional[int] = None  # take the first N rows (smoke tests, demos)
    limit_eval_rows: Optional[int] = None
    num_workers: int = 0  # tokenization worker processes (0 = in-process)
    loader_workers: int = 0  # DataLoader workers that collate micro-batches ahead
    cache_dir: str = "${project_root:}/.cache/tokenized"


@dataclass
class LossConfig:
    # ce: cross entropy on the (possibly soft) labels. distill: (1 - teacher_weight) x that +
    # teacher_weight x temperature^2 x KL(teacher_T || student_T), where _T is softmax(log p / T)
    # and the teacher's p comes from the rows' teacher_<class> columns (docs/recipe.md).
    kind: str = "ce"  # ce | distill
    teacher_weight: float = 0.5
    temperature: float = 1.0


@dataclass
class OptimConfig:
    name: str = "anyprecision_adamw"  # anyprecision_adamw | adamw
    lr: float = 2.5e-6
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-6
    weight_decay: float = 0.01
    use_kahan_summation: bool = True
    momentum_dtype: str = "bfloat16"
    variance_dtype: str = "bfloat16"
    compensation_dtype: str = "bfloat16"
    no_decay_embeddings: bool = True
    grad_clip: Optional[float] = 1.0
    # Schedule: linear warmup over warmup_ratio of the steps, then decay.
    warmup_ratio: float = 0.1
    warmup_steps: Optional[int] = None  # overrides warmup_ratio
    decay: str = "linear"  # linear | cosine | constant
    min_lr_ratio: float = 0.0


@dataclass
class ParallelConfig:
    # FSDP2: each decoder layer is one unit, then embeddings, then the root.
    dp_replicate: int = 1  # > 1 gives HSDP: replicate across groups, shard inside each
    param_dtype: str = "float32"  # compute dtype of unsharded params (bfloat16 on GPU)
    reduce_dtype: str = "float32"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    backend: str = "auto"  # auto | nccl | gloo


@dataclass
class TrainerConfig:
    seed: int = 0
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (all epochs)
    eval_every: Optional[int] = None  # steps; evaluation also runs at the end
    log_every: int = 1
    run_dir: Optional[str] = None  # null: runs/<experiment>-<timestamp>
    device: str = "auto"  # auto | cpu | cuda
    loss_buffer_size: int = 64
    resume: str = "auto"  # auto (latest complete checkpoint in run_dir) | never | <path>
    peak_flops_per_device: Optional[float] = None  # for MFU; null picks by device
    num_threads: Optional[int] = None  # torch intra-op threads per rank on CPU
    write_eval_predictions: bool = True


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: Optional[int] = None
    keep_last: int = 2
    at_end: bool = True
    async_save: bool = False


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "arena-trainer"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    group: Optional[str] = None
    notes: Optional[str] = None


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    level: str = "INFO"
    progress_bar: bool = True


@dataclass
class LauncherConfig:
    # Consumed by launch.submit (submitit); slurm/train.sh reads #SBATCH lines instead.
    executor: str = "auto"  # auto (slurm when sbatch is on PATH) | slurm | local
    nodes: int = 1
    gpus_per_node: int = 8  # GPUs requested per node (0 on CPU-only clusters)
    nproc_per_node: Optional[int] = None  # ranks per node; defaults to gpus_per_node
    cpus_per_task: int = 16
    mem_gb: Optional[int] = None
    timeout_min: int = 240
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    job_name: str = "arena-trainer"
    folder: str = "logs/submitit"
    signal_delay_s: int = 300
    max_requeues: int = 10
    rdzv_port: Optional[int] = None  # null: 20000 + job id % 20000, as slurm/train.sh does
    setup: list[str] = field(default_factory=list)  # shell lines run before torchrun


@dataclass
class PlanConfig:
    # launch.plan (trainer/planner.py): the hardware a plan assumes; every figure overridable.
    world_size: Optional[int] = None  # null: launcher.nodes x (launcher.nproc_per_node or gpus_per_node)
    gpu_memory_gb: float = 80.0
    peak_tflops: Optional[float] = None  # null: trainer.peak_flops_per_device, else 989 (H100 bf16 dense)
    mfu: float = 0.4  # model FLOPs utilisation assumed for the compute time
    intra_node_gb_s: float = 150.0  # effective per-GPU FSDP collective bandwidth inside a node (NVLink)
    inter_node_gb_s: float = 20.0  # the same across nodes (a 200-400 Gb/s NIC per GPU, effective)
    overhead_gb: float = 3.0  # CUDA context, allocator fragmentation, NCCL buffers


@dataclass
class Config:
    experiment: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.task": ("arena", "text_classification"),
    "model.head": HEADS,
    "model.attn_impl": ATTN_IMPLS,
    "model.rope_impl": ROPE_IMPLS,
    "model.dtype": ("float32", "bfloat16"),
    "model.adapter.name": ADAPTERS,
    "model.compile_backend": ("inductor", "aot_eager", "eager"),
    "data.on_bad_row": ("error", "skip"),
    "data.prompt_layout": ("interleaved", "sequential"),
    "loss.kind": ("ce", "distill"),
    "optim.name": ("anyprecision_adamw", "adamw"),
    "optim.decay": ("linear", "cosine", "constant"),
    "optim.momentum_dtype": ("float32", "bfloat16", "float16"),
    "optim.variance_dtype": ("float32", "bfloat16", "float16"),
    "optim.compensation_dtype": ("float32", "bfloat16", "float16"),
    "parallel.param_dtype": ("float32", "bfloat16"),
    "parallel.reduce_dtype": ("float32", "bfloat16"),
    "parallel.backend": ("auto", "nccl", "gloo"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
    "launcher.executor": ("auto", "slurm", "local"),
}


def register_configs() -> None:
    _register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)


def _unknown_keys(cfg: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys a ``+key=value`` override slipped past the schema (Hydra lifts struct mode for it)."""
    known = {f.name: f for f in fields(schema)}
    out = []
    for key in cfg.keys():
        if key not in known:
            out.append(f"{prefix}{key}")
            continue
        factory = known[key].default_factory
        sub = factory() if callable(factory) else None
        if is_dataclass(sub) and isinstance(cfg[key], DictConfig):
            out += _unknown_keys(cfg[key], type(sub), f"{prefix}{key}.")
    return out


def _closest(key: str) -> str:
    """ ' (did you mean model.hidden_size?)' for a misspelt key, else ''."""
    parent, _, name = key.rpartition(".")
    node = OmegaConf.structured(Config)
    node = OmegaConf.select(node, parent) if parent else node
    options = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    match = difflib.get_close_matches(name, options, n=1)
    if not match:
        return ""
    return f" (did you mean {parent + '.' if parent else ''}{match[0]}?)"


def validate(cfg: DictConfig) -> None:
    """Checks beyond types: unknown keys, missing values, enumerations, ranges, combinations.
    Raises ConfigError naming the key."""
    unknown = _unknown_keys(cfg, Config)
    if unknown:
        raise ConfigError(f"config key '{unknown[0]}' is not part of the schema (trainer/config.py)"
                          f"{_closest(unknown[0])}")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # noqa: BLE001 - MissingMandatoryValue / interpolation errors name the key
        raise config_error(e) from None
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"config key '{key}' = {value!r}: expected one of {list(choices)}")
    positive = ["data.max_length", "data.max_tokens", "data.global_batch_rows", "trainer.epochs",
                "trainer.loss_buffer_size", "checkpoint.keep_last", "parallel.dp_replicate",
                "model.hidden_size", "model.num_hidden_layers", "model.vocab_size"]
    for key in positive:
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {OmegaConf.select(cfg, key)}")
    for key in ["trainer.max_steps", "trainer.eval_every", "checkpoint.every_steps"]:
        value = OmegaConf.select(cfg, key)
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0 or null, got {value}")
    if not 0.0 <= cfg.model.head_dropout < 1.0:
        raise ConfigError(f"config key 'model.head_dropout' must be in [0, 1), got {cfg.model.head_dropout}")
    if cfg.data.max_length > cfg.data.max_tokens:
        raise ConfigError(
            f"config key 'data.max_length' ({cfg.data.max_length}) exceeds 'data.max_tokens' "
            f"({cfg.data.max_tokens}): a single row could never fit in a micro-batch")
    if cfg.model.hidden_size % 2:
        raise ConfigError("config key 'model.hidden_size' must be even (the mlp head uses h/2)")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' needs two values, got {list(cfg.optim.betas)}")
    d, m = cfg.data, cfg.model
    if d.eval_fraction is not None and not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"config key 'data.eval_fraction' must be in (0, 1) or null, got {d.eval_fraction}")
    if d.eval_fraction is not None and d.eval_path:
        raise ConfigError(f"config key 'data.eval_fraction' = {d.eval_fraction} holds rows out of the training file "
                          f"only without an eval file, but data.eval_path = {d.eval_path}: set data.eval_path=null "
                          "(or drop data.eval_fraction)")
    swap = swap_mode(d.swap_ab)
    if swap != "none" and d.task != "arena":
        raise ConfigError(f"config key 'data.swap_ab' = {d.swap_ab}: task {d.task} has no A/B swap "
                          "(set data.swap_ab=none)")
    if swap == "full" and d.global_batch_rows % 2:
        raise ConfigError(f"config key 'data.global_batch_rows' = {d.global_batch_rows} with data.swap_ab=full: each "
                          "step holds whole pairs (a row and its A/B-swapped twin), so it must be even")
    if not 0.0 <= cfg.loss.teacher_weight <= 1.0:
        raise ConfigError(f"config key 'loss.teacher_weight' must be in [0, 1], got {cfg.loss.teacher_weight}")
    if not cfg.loss.temperature > 0:
        raise ConfigError(f"config key 'loss.temperature' must be > 0, got {cfg.loss.temperature}")
    if d.class_names is not None and d.task != "text_classification":
        raise ConfigError(f"config key 'data.class_names' is for data/task=text_classification (task is {d.task})")
    _validate_adapter(m.adapter)
    if m.adapter.name == "qlora" and cfg.parallel.cpu_offload:
        raise ConfigError("config key 'parallel.cpu_offload' = true with model.adapter=qlora: FSDP2's CPU offload does "
                          "not handle NF4 weights (and a 4-bit base rarely needs it); set parallel.cpu_offload=false")
    if m.query_pre_attn_scalar is None and not m.name_or_path:
        raise ConfigError("config key 'model.query_pre_attn_scalar' = null means 'keep the checkpoint's value' and "
                          "needs model.name_or_path; set a number to train from scratch")


SWAP_MODES = ("none", "double", "full")
_SWAP_ALIASES = {True: "double", False: "none", "true": "double", "false": "none"}


def swap_mode(value: Any) -> str:
    """``data.swap_ab`` as one of SWAP_MODES (true / false are aliases of double / none)."""
    key = value.strip().lower() if isinstance(value, str) else value
    mode = _SWAP_ALIASES.get(key, key) if isinstance(key, (bool, str)) else None
    if mode not in SWAP_MODES:
        raise ConfigError(f"config key 'data.swap_ab' = {value!r}: expected one of {list(SWAP_MODES)} "
                          "(or true / false, aliases of double / none)")
    return mode


def _validate_adapter(a: DictConfig) -> None:
    if a.name == "none":
        return
    if a.rank <= 0:
        raise ConfigError(f"config key 'model.adapter.rank' must be > 0, got {a.rank}")
    if a.alpha is not None and a.alpha <= 0:
        raise ConfigError(f"config key 'model.adapter.alpha' must be > 0 or null (= 2 x rank), got {a.alpha}")
    if not 0.0 <= a.dropout < 1.0:
        raise ConfigError(f"config key 'model.adapter.dropout' must be in [0, 1), got {a.dropout}")
    unknown = [t for t in a.target_modules if t not in TARGETS]
    if unknown or not a.target_modules:
        raise ConfigError(f"config key 'model.adapter.target_modules' = {list(a.target_modules)}: expected a non-empty "
                          f"subset of {list(TARGETS)}")
    for key in ("nf4_block_size", "nf4_scaler_block_size"):
        if a[key] <= 0:
            raise ConfigError(f"config key 'model.adapter.{key}' must be > 0, got {a[key]}")


_NOISE = re.compile(r"^\s*(reference_type|object_type|provider)=|^Config search path|^To append to your config|"
                    r"^See https://hydra.cc")


def config_error(e: BaseException) -> ConfigError:
    """One line from a Hydra / OmegaConf error (and its cause): what is wrong and with which key."""
    parts: list[str] = []
    for err in (e, e.__cause__):
        if err is None:
            continue
        for line in str(err).splitlines():
            text = line.strip()
            if not text or _NOISE.search(line) or text in parts:
                continue
            if line.startswith("\t") and parts and parts[-1].endswith((":", ",")):
                parts[-1] += (" " if parts[-1].endswith(":") else " ") + text + ","  # a listed option
            else:
                parts.append(text)
    text = re.sub(r"\s+", " ", "; ".join(p.rstrip(",") for p in parts)).replace(".;", ";")
    text = text.replace("ConfigError raised while resolving interpolation: ", "")
    key = re.search(r"full_key: ([\w.]+)", text)
    if key and " not in " in text:
        text += _closest(key.group(1))
    return ConfigError(text if len(text) <= 600 else text[:600] + "...")


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose ``conf/`` with Hydra's override grammar and validate it (the entry points,
    launch.submit, tests). Any composition error is a one-line ConfigError naming the key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []))
    except (HydraException, OmegaConfBaseException) as e:
        raise config_error(e) from e
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


register_configs()
