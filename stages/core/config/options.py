"""The option classes of the single-stage commands: one frozen dataclass per command, each field with its
one-line help (`doc`), its --help group (`HELP_GROUPS`) and its checks (`check()`, run on construction).

Precedence is defaults < YAML (`--config FILE.yaml`) < CLI flags, by the engine (`engine.py`). Unknown keys
and values of the wrong type are errors that name the key, raised in the driver before any Ray worker
starts. The loss names and the storage-option rules checked here are declared here, not imported: the
config package imports no project module but errors, and the modules that implement them are tested
against these declarations. The online commands' classes are in `online.py`, the chains' in `chain.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from stages.core.config.engine import ConfigError, doc, parse_options

# The loss family by name; `stages.core.training.losses.LOSSES` implements exactly these (a test holds them equal).
LOSS_NAMES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo", "orpo")
# Losses on unpaired examples (KTO shards); `stages.core.training.unpaired_losses.UNPAIRED_LOSSES` implements these.
UNPAIRED_LOSS_NAMES = ("kto", "apo_zero_unpaired")
Dtype = Literal["float32", "bfloat16"]
# How packed rows attend (stages.core.scoring.attention): one name for precompute, train and eval.
Attention = Literal["auto", "dense", "flex", "varlen"]
ATTENTION_HELP = ("packed rows' attention: dense (a (T, T) mask per row, padded: the CPU path), flex (FlexAttention "
                  "block masks: several pairs end to end in one sequence, no padding, no dense mask; compiled on "
                  "CUDA), varlen (the same layout as variable-length documents: flash attention's varlen kernels on "
                  "CUDA, no mask at all), auto (flex on CUDA where torch has it, else varlen where a flash kernel "
                  "is, else dense); the values agree to float precision")


def parse_loss_types(loss_type: str, loss_weights: str | None) -> list[tuple[str, float]]:
    """'sigmoid,sft' + '1,0.2' -> [('sigmoid', 1.0), ('sft', 0.2)]; errors name the bad entry."""
    names = [n.strip() for n in loss_type.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOSS_NAMES + UNPAIRED_LOSS_NAMES]
    if not names or unknown:
        raise ConfigError(f"config key 'loss_type': unknown loss {', '.join(unknown) or repr(loss_type)}; "
                          f"choose from {', '.join(LOSS_NAMES)} (pairs) or {', '.join(UNPAIRED_LOSS_NAMES)} "
                          "(unpaired examples)")
    unpaired = [n for n in names if n in UNPAIRED_LOSS_NAMES]
    if unpaired and len(names) > 1:
        raise ConfigError(f"config key 'loss_type': {', '.join(unpaired)} (unpaired examples) cannot be combined "
                          "with other losses")
    if loss_weights in (None, ""):
        return [(n, 1.0) for n in names]
    try:
        weights = [float(w) for w in str(loss_weights).split(",")]
    except ValueError:
        raise ConfigError(f"config key 'loss_weights': {loss_weights!r} is not a list of numbers") from None
    if len(weights) != len(names):
        raise ConfigError(f"config key 'loss_weights': {len(weights)} weights for {len(names)} losses")
    return list(zip(names, weights))


def parse_storage_options(options_json: str | None) -> dict:
    """The `--storage-options` JSON as a dict ({} when unset): for a command that parses its own flags."""
    return parse_options("storage_options", options_json)


def check_limit(limit: int | None, reads: str) -> None:
    """--limit N reads the first N rows; 0 would read nothing, which can only be a mistake."""
    if limit is not None and limit <= 0:
        raise ConfigError(f"config key 'limit': --limit {limit} reads no {reads}; give 1 or more, or leave it out "
                          f"to read every one")


def mappings(cfg: Any, *names: str) -> None:
    """Dict fields hold dicts: a JSON string given to the constructor is a caller's mistake, not a value."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key '{name}': expected a mapping of keys, got {type(value).__name__}")


def positive(cfg: Any, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{name}': must be positive, got {value}")


# --help groups, in the order they are shown, and the fields of each (a test holds every command's fields to
# them, so a new key cannot land in "other" unnoticed; the CLI still works if one does).
HELP_GROUPS = {
    "input": ("data", "refs", "candidates", "prompts", "format", "split", "limit", "prompt_column", "chosen_column",
              "rejected_column", "completion_column", "label_column", "unpair", "kl_seed"),
    "lengths and truncation": ("max_length", "max_prompt_length", "truncation_mode"),
    "model": ("model", "dtype", "pack_prompts", "attention", "gradient_checkpointing", "compile", "lora_r",
              "lora_alpha", "lora_dropout", "lora_target_modules"),
    "output": ("output", "overwrite", "append", "rows_per_shard", "rows_per_file", "runs", "run_name", "date"),
    "training": ("learning_rate", "weight_decay", "lr_scheduler", "warmup_ratio", "max_steps", "epochs",
                 "max_grad_norm", "shuffle_buffer"),
    "loss": ("loss_type", "loss_weights", "beta", "label_smoothing", "discopop_tau", "simpo_gamma",
             "desirable_weight", "undesirable_weight"),
    "checkpoints": ("save_every", "keep_checkpoints", "stop_at_step", "resume"),
    "evaluation": ("eval_refs", "eval_every", "early_stopping_patience", "early_stopping_metric", "score_final"),
    "sampling": ("num_samples", "temperature", "top_p", "max_new_tokens", "seed", "engine", "samples"),
    "judge": ("reward_model", "reward_fn", "labels", "implicit", "export_sheet", "pairs", "min_margin",
              "missing_eos_penalty"),
    "rounds": ("rounds", "new_rounds", "reference"),
    "stage options": ("precompute_options", "train_options", "eval_options", "generate_options", "judge_options"),
    "workers and devices": ("device", "gpu_wait_seconds", "num_workers", "gpus_per_worker", "strategy",
                            "max_failures", "batch_size", "micro_batch_size", "micro_batch_tokens",
                            "tokens_per_forward"),
    "storage": ("storage_options",),
    "progress": ("progress",),
}


@dataclass(frozen=True)
class Common:
    """Fields every stage has."""

    HELP_GROUPS: ClassVar[dict[str, tuple[str, ...]]] = HELP_GROUPS

    storage_options: dict | None = doc("fsspec options (endpoint, profile, ...): a YAML mapping, or JSON on the "
                                       "command line; secrets are never written", default=None)
    progress: bool = doc("show a progress bar", default=True)
    device: Literal["auto", "cuda", "cpu"] = doc(
        "auto: a GPU where the cluster has one now (the choice and why are printed); cuda: ask Ray for GPUs "
        "(an autoscaler adds GPU nodes), never fall back to the CPU; cpu: never use a GPU", default="auto")
    gpu_wait_seconds: float = doc("how long --device cuda waits for the Ray cluster's GPUs before failing",
                                  default=600.0)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        mappings(self, "storage_options")
        positive(self, "gpu_wait_seconds")

    @property
    def storage_options_dict(self) -> dict:
        return dict(self.storage_options or {})


@dataclass(frozen=True)
class PrecomputeConfig(Common):
    data: str = doc("input: file, directory, save_to_disk dir, fsspec URL, or hub name",
                    default="embedded:hh-rlhf-helpful")
    model: str = doc("reference model: local dir, hub name, or 'embedded:smollm2-135m-instruct'",
                     default="embedded:smollm2-135m-instruct")
    output: str = doc("output directory or fsspec URL for shards, rejects and manifest.json", default="runs/demo")
    format: Literal["auto", "standard", "hh", "ultrafeedback", "helpsteer3", "openai", "sharegpt", "unpaired"] = doc(
        "input layout; auto detects openai/sharegpt/helpsteer3 and unpaired (prompt, completion, label: KTO) "
        "rows and otherwise reads TRL's standard or conversational pairs as-is (hh text is only parsed into "
        "turns with --format hh)", default="auto")
    prompt_column: str = doc("column holding the prompt (optional: implicit prompts are extracted)", default="prompt")
    chosen_column: str = doc("column holding the chosen answer", default="chosen")
    rejected_column: str = doc("column holding the rejected answer", default="rejected")
    completion_column: str = doc("column holding the completion of an unpaired example", default="completion")
    label_column: str = doc("column holding an unpaired example's label (true: desirable)", default="label")
    unpair: bool = doc("turn each pair into two unpaired examples (chosen: desirable, rejected: undesirable; "
                       "source_index 2i and 2i+1), as TRL's unpair_preference_dataset, for KTO", default=False)
    kl_seed: int = doc("seed of the KL pairing of unpaired examples (each with another example's completion "
                       "of its shard)", default=0)
    split: str = doc("split to read from a DatasetDict / hub dataset", default="train")
    max_length: int | None = doc("max tokens of prompt+completion, TRL's max_length (None: no limit)", default=1024)
    max_prompt_length: int | None = doc("max prompt tokens before max_length applies (None: no limit)", default=None)
    truncation_mode: Literal["keep_start", "keep_end"] = doc("which end of a too-long sequence to keep",
                                                             default="keep_start")
    batch_size: int | None = doc("pairs per scorer call, cut by length into forwards inside the call (None: 64 on "
                                 "CPU, 512 on a GPU, where bigger calls fill bigger forwards)", default=None)
    num_workers: int = doc("scorer actors (one GPU each where CUDA exists)", default=1)
    gpus_per_worker: int = doc("GPUs of one node per scorer actor: a reference too big for one GPU is spread "
                               "over K GPUs (device_map); needs CUDA when above 1", default=1)
    dtype: Dtype = doc("reference model dtype", default="float32")
    pack_prompts: bool = doc("score each prompt once for both answers (packed rows, 4D mask)", default=True)
    attention: Attention = doc(ATTENTION_HELP, default="auto")
    tokens_per_forward: int | None = doc("tokens in one forward of a scorer, padding included (None: 8192 on CPU; "
                                         "on CUDA sized from the model and the GPU's free memory)", default=None)
    rows_per_shard: int = doc("new input rows per output shard: each run groups the rows it has not seen "
                              "before, in input order, into shards of this many", default=1000)
    limit: int | None = doc("read only the first N input rows", default=None)
    overwrite: bool = doc("replace an existing output made with other settings", default=False)
    append: bool = doc("add rows of another --data to an output that holds a different data set", default=False)

    def check(self) -> None:
        super().check()
        positive(self, "batch_size", "num_workers", "gpus_per_worker", "rows_per_shard", "max_length",
                  "max_prompt_length", "tokens_per_forward")
        check_limit(self.limit, "input rows")
        ml, mpl = self.max_length, self.max_prompt_length
        if ml is not None and mpl is not None and mpl >= ml:
            raise ConfigError(f"config key 'max_prompt_length': {mpl} leaves no room under max_length {ml}")


@dataclass(frozen=True)
class PolicyPass(Common):
    """What a pass of the policy over shard pairs needs: the loss, its parameters, batching, dtype."""

    loss_type: str = doc("loss or comma list: " + ", ".join(LOSS_NAMES) + "; on unpaired shards (KTO examples): "
                         + " or ".join(UNPAIRED_LOSS_NAMES), default="sigmoid")
    loss_weights: str | None = doc("comma list of weights, one per loss (default: all 1)", default=None)
    beta: float = doc("KL strength beta (IPO tau, ORPO lambda)", default=0.1)
    label_smoothing: float = doc("assumed label-flip rate for robust / exo_pair / aot / simpo", default=0.0)
    discopop_tau: float = doc("DiscoPOP temperature", default=0.05)
    simpo_gamma: float = doc("SimPO target reward margin gamma, in the units of beta * average log-prob",
                             default=0.5)
    desirable_weight: float = doc("KTO: weight of each desirable example's loss (lambda_D)", default=1.0)
    undesirable_weight: float = doc("KTO: weight of each undesirable example's loss (lambda_U)", default=1.0)
    micro_batch_size: int = doc("pairs per forward/backward on one worker", default=2)
    dtype: Dtype = doc("compute dtype (bfloat16: autocast over float32 weights)", default="float32")
    pack_prompts: bool = doc("run each prompt once for both answers (packed rows, 4D mask): fewer tokens, "
                             "less activation memory, same values", default=True)
    attention: Attention = doc(ATTENTION_HELP, default="auto")

    def check(self) -> None:
        super().check()
        positive(self, "micro_batch_size", "discopop_tau", "desirable_weight", "undesirable_weight")
        self.check_beta()
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"config key 'label_smoothing': must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type is not None:
            parse_loss_types(self.loss_type, self.loss_weights)

    def check_beta(self) -> None:
        # eval's may be unset (the run's, filled in by eval); the sweep's is a list (its own check)
        if self.beta is not None and self.beta <= 0:
            raise ConfigError(f"config key 'beta': must be positive, got {self.beta}")

    @property
    def loss_terms(self) -> list[tuple[str, float]]:
        return parse_loss_types(self.loss_type, self.loss_weights)


@dataclass(frozen=True)
class TrainConfig(PolicyPass):
    refs: str = doc("precompute output (shards + manifest.json), local or fsspec URL", default="runs/demo")
    model: str | None = doc("policy initialisation (default: the manifest's reference model)", default=None)
    output: str | None = doc("run folder: metrics, checkpoints, final/ (default: REFS/policy)", default=None)
    learning_rate: float = doc("peak AdamW learning rate", default=5e-6)
    weight_decay: float = doc("AdamW weight decay", default=0.0)
    lr_scheduler: Literal["linear", "cosine", "constant"] = doc("decay after warmup", default="linear")
    warmup_ratio: float = doc("fraction of steps spent warming up", default=0.1)
    batch_size: int = doc("pairs per optimizer step (global, over all workers)", group="training", default=8)
    micro_batch_tokens: int | None = doc(
        "tokens per forward/backward on one worker, padding included: micro-batches are cut from the length-sorted "
        "pairs to fill it, so short pairs share a forward and long ones go alone; wins over micro_batch_size "
        "(None: micro_batch_size pairs each)", default=None)
    max_steps: int | None = doc("optimizer steps (wins over epochs)", default=None)
    epochs: int = doc("passes over the shards when max_steps is unset", default=1)
    max_grad_norm: float = doc("gradient clipping norm (0: off)", default=1.0)
    stop_at_step: int | None = doc("end this invocation after this step, with a checkpoint (the schedule still "
                                   "spans max_steps/epochs): time-sliced or preemptible jobs resume with --resume",
                                   default=None)
    save_every: int = doc("write checkpoints/step-N every N steps (0: never)", default=0)
    keep_checkpoints: int = doc("how many recent checkpoints to keep", default=2)
    resume: Literal["false", "true", "auto"] = doc(
        "continue from the latest checkpoint in OUTPUT: true (error if none), auto (if one exists: for "
        "re-submitted or pre-empted jobs), false", default="false")
    eval_refs: str | None = doc("precompute output of a held-out set, evaluated every eval_every steps", default=None)
    eval_every: int = doc("steps between evaluations (0: only at the end, when eval_refs is set)", default=0)
    early_stopping_patience: int = doc("stop after this many evaluations without improvement (0: off); "
                                       "the best weights are kept in OUTPUT/best", default=0)
    early_stopping_metric: Literal["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"] = doc(
        "what early stopping watches (loss: lower is better; the others: higher)", default="eval/loss")
    num_workers: int = doc("Ray Train workers (gloo on CPU, NCCL on GPU); 1 runs in-process", default=1)
    strategy: Literal["ddp", "fsdp"] = doc(
        "how workers share the policy: ddp (a full copy each, gradients all-reduced during backward) or fsdp "
        "(FSDP2: parameters, gradients and optimizer state sharded per decoder layer)", default="ddp")
    max_failures: int = doc("Ray Train restarts of the worker group after a worker dies; each restart resumes from "
                            "the latest checkpoint (use with --save-every)", default=0)
    lora_r: int = doc("LoRA rank (0: train all weights); only the adapters get gradients and optimizer state",
                      default=0)
    lora_alpha: float = doc("LoRA scaling alpha (the update is alpha / r * B A)", default=16.0)
    lora_dropout: float = doc("dropout on the LoRA branch", default=0.0)
    lora_target_modules: str = doc("comma list of module names that get adapters, or all-linear (every linear "
                                   "layer but the LM head)", default="all-linear")
    seed: int = doc("seed for shard order, shuffle buffer and torch", group="training", default=0)
    gradient_checkpointing: bool = doc("recompute activations in backward: less memory for more time per step "
                                       "(on, as in TRL; false for the fastest steps)", default=True)
    shuffle_buffer: int = doc("pairs held for shuffling within the stream", default=256)
    compile: bool = doc("torch.compile each decoder layer (dynamic shapes): the first steps pay the compile time "
                        "(tens of seconds), later ones run fused kernels; meant for GPUs (see BENCHMARKS.md)",
                        default=False)
    overwrite: bool = doc("start over in an OUTPUT that already has a run (its old files are removed)",
                          default=False)

    def check(self) -> None:
        super().check()
        positive(self, "learning_rate", "batch_size", "max_steps", "epochs", "keep_checkpoints", "num_workers",
                  "shuffle_buffer", "stop_at_step")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"config key 'warmup_ratio': must be in [0, 1], got {self.warmup_ratio}")
        for name in ("save_every", "eval_every", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name}': must be 0 (off) or positive, got {getattr(self, name)}")
        if self.max_failures < 0 or self.lora_r < 0:
            raise ConfigError("config keys 'max_failures', 'lora_r': must be 0 or positive "
                              f"(got {self.max_failures}, {self.lora_r})")
        if not 0 <= self.lora_dropout < 1 or self.lora_alpha <= 0:
            raise ConfigError(f"config keys 'lora_dropout', 'lora_alpha': need 0 <= dropout < 1 and alpha > 0 "
                              f"(got {self.lora_dropout}, {self.lora_alpha})")
        if self.early_stopping_patience and not self.eval_refs:
            raise ConfigError("config key 'early_stopping_patience': needs eval_refs (a held-out set to watch)")


@dataclass(frozen=True)
class EvalConfig(PolicyPass):
    refs: str = doc("precompute output of a held-out set", default="runs/demo-heldout")
    model: str | None = doc("policy to score: a final/, best/, final/adapter/ (LoRA) or checkpoints/step-N folder "
                            "(default: the reference itself)", default=None)
    output: str | None = doc("where eval.json and samples go (default: MODEL/eval, or runs/eval)", default=None)
    loss_type: str | None = doc("loss reported as eval/loss (default: the run's, from the train_config.yaml "
                                "beside MODEL, else sigmoid): " + ", ".join(LOSS_NAMES), default=None)
    beta: float | None = doc("beta of the implicit reward (default: the run's, else 0.1)", default=None)
    micro_batch_size: int = doc("pairs per forward", default=4)
    samples: int = doc("side-by-side generations from reference and policy for N held-out prompts", default=0)
    max_new_tokens: int = doc("generation length for samples", default=128)
    temperature: float = doc("sampling temperature for samples (0: greedy)", default=0.7)
    top_p: float = doc("nucleus sampling for samples", default=0.9)
    seed: int = doc("seed for sampling (the same for both models)", default=0)

    def check(self) -> None:
        super().check()
        positive(self, "max_new_tokens")
        if self.samples < 0 or self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("config keys 'samples', 'temperature', 'top_p': need samples >= 0, temperature >= 0, "
                              f"0 < top_p <= 1 (got {self.samples}, {self.temperature}, {self.top_p})")


@dataclass(frozen=True)
class SweepConfig(TrainConfig):
    """Every training key, with `beta` a list: one training run per beta."""

    beta: list[float] = doc("betas, one short training run each: a YAML list, or a comma list on the command "
                            "line", default_factory=lambda: [0.01, 0.05, 0.1, 0.5])
    eval_refs: str = doc("precompute output of a held-out set", default="runs/demo-heldout")
    output: str = doc("sweep folder: one run per beta (OUTPUT/beta-B), sweep.png, sweep.md, sweep.json",
                      default="runs/sweep")
    overwrite: bool = doc("start each beta's run over when its folder holds one", default=True)

    def check_beta(self) -> None:
        if not isinstance(self.beta, list) or not self.beta or any(b <= 0 for b in self.beta):
            raise ConfigError(f"config key 'beta': need a list of positive betas, got {self.beta!r}")

    def run_config(self, beta: float) -> TrainConfig:
        """The training run of one beta: every other key as given."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**values, "beta": beta, "output": f"{self.output.rstrip('/')}/beta-{beta:g}"})


