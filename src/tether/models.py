"""Loading the model and tokenizer to fine-tune (from a path or hub id, or a synthetic tiny one), LoRA and OSF."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from tether.config import LoraSection, ModelConfig, OsfSection, RunConfig
from tether.errors import ConfigError, one_line

if TYPE_CHECKING:
    from tether.data import Labels

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Loaded(NamedTuple):
    model: nn.Module
    tokenizer: Any
    new_parameters: frozenset[str] = frozenset()
    """Parameters the checkpoint lacked (or held in another shape), so loading initialized them: a classification
    head on a language model. Not pre-trained, so never pulled toward their initial values (RegularizerStack)."""


def load_model(cfg: ModelConfig, task: str, labels: Labels | None = None) -> Loaded:
    """(model, tokenizer, new parameters); the tokenizer always has a pad token and the model config knows its id.
    A classifier gets `labels`' number of classes (else model.num_labels, else the checkpoint's own), and their
    names as id2label / label2id (saved with the model)."""
    num_labels = labels.num_labels if labels is not None else cfg.num_labels
    loaded = _synthetic(cfg, task, num_labels) if cfg.synthetic is not None else _pretrained(cfg, task, num_labels)
    model, tokenizer, new = loaded
    prepare_tokenizer(tokenizer, task, cfg)
    model.config.pad_token_id = tokenizer.pad_token_id
    if labels is not None and labels.names is not None:
        model.config.id2label = dict(enumerate(labels.names))
        model.config.label2id = {name: i for i, name in enumerate(labels.names)}
    if new:
        log.warning(
            "initialized by loading (not in the checkpoint), trained without an anchor: %s", ", ".join(sorted(new))
        )
    return loaded


def checkpoint_classes(cfg: ModelConfig) -> tuple[str, ...] | None:
    """The class names a pre-trained classifier's config gives (None for a synthetic model, numbered classes
    LABEL_0.., or a config that cannot be read: loading the model then says why)."""
    if cfg.path is None:
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError):
        return None
    names = tuple(str(config.id2label[i]) for i in range(config.num_labels))
    return None if all(name == f"LABEL_{i}" for i, name in enumerate(names)) else names


class PositionLimit(NamedTuple):
    """How many positions a model's learned position table serves, and the config field that sizes it."""

    positions: int
    field: str
    count: int
    """The field's value (RoBERTa's table spends padding_idx + 1 of its rows before the first position)."""


def position_limit(model: nn.Module) -> PositionLimit | None:
    """The positions a model with learned absolute position embeddings can look up (GPT-2's wpe, BERT's and
    DistilBERT's position_embeddings, OPT's embed_positions); None for rotary, ALiBi and relative models, whose
    max_position_embeddings is no hard limit. The table is found by its size, not its name: an nn.Embedding beside
    the token embeddings with the config's position count of rows, or 2 more (OPT and BART number positions from 2).
    A table with a padding row (RoBERTa, XLM-R) numbers positions from padding_idx + 1."""
    config = model.config
    count = getattr(config, "max_position_embeddings", None)  # GPT-2's n_positions, through its attribute_map
    if not isinstance(count, int):
        return None
    tokens = model.get_input_embeddings()
    usable = [
        min(count, e.num_embeddings - (0 if e.padding_idx is None else e.padding_idx + 1))
        for e in model.modules()
        if isinstance(e, nn.Embedding) and e is not tokens and count <= e.num_embeddings <= count + 2
    ]
    if not usable:
        return None
    field = config.attribute_map.get("max_position_embeddings", "max_position_embeddings")
    return PositionLimit(min(usable), field, count)


def check_positions(model: nn.Module, max_length: int) -> None:
    """A ConfigError when examples of max_length tokens would look up positions past the model's learned position
    table (an index error deep in the forward). Windows and packed rows hold at most max_length tokens and number
    their positions from 0, so max_length is the bound for all of them."""
    limit = position_limit(model)
    if limit is None or max_length <= limit.positions:
        return
    spare = "" if limit.positions == limit.count else ", less the rows before its first position"
    raise ConfigError(
        f"data.max_length {max_length} is longer than the {limit.positions} positions this model's learned position "
        f"embeddings hold ({limit.field} {limit.count}{spare}): lower data.max_length to {limit.positions} or less"
    )


def check_max_length(cfg: ModelConfig, task: str, max_length: int) -> None:
    """check_positions before any weight is read (`tether train` before it writes anything): the model's modules are
    built from its config on the meta device. A config that cannot be read or built is left to loading the model,
    which says why."""
    model = _skeleton(cfg, task)
    if model is not None:
        check_positions(model, max_length)


def _skeleton(cfg: ModelConfig, task: str) -> nn.Module | None:
    """The model's modules without memory or weights (meta tensors), or None when its config cannot be built."""
    if cfg.synthetic is not None:
        with torch.device("meta"):
            return _synthetic(cfg, task, None).model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    try:
        config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, ImportError, RuntimeError, NotImplementedError) as e:
        log.debug("no meta-device model of %s to check positions against: %s", cfg.path, e)
        return None


def check_checkpoint(cfg: RunConfig) -> None:
    """What `tether validate` can tell from the checkpoint's config, without its weights (one meta-device build):
    data.max_length past a learned position table, and a classification head that loading will initialize (the
    checkpoint is no *ForSequenceClassification), which leaves kl / distill a random reference."""
    from tether.regularizers import RegularizerStack, parse_entries

    model = _skeleton(cfg.model, cfg.task)
    if model is None:
        return
    check_positions(model, cfg.data.max_length)
    architectures = model.config.architectures or []  # as the checkpoint's config.json names them
    saved_head = any(a.endswith("ForSequenceClassification") for a in architectures)
    if cfg.task == "sequence_classification" and cfg.model.path is not None and not saved_head:
        new = frozenset({"the classification head"})
        RegularizerStack.from_configs(parse_entries(cfg.regularizers), 0, new).check_reference_is_pretrained()


def load_tokenizer(cfg: ModelConfig, task: str) -> Any:
    """The tokenizer alone, prepared as load_model prepares it (what `tether validate` checks)."""
    if cfg.synthetic is not None:
        from tether.synthetic import char_tokenizer

        tokenizer = char_tokenizer()
    else:
        tokenizer = _auto_tokenizer(cfg)
    prepare_tokenizer(tokenizer, task, cfg)
    return tokenizer


def prepare_tokenizer(tokenizer: Any, task: str, cfg: ModelConfig) -> None:
    """Pad with eos when the tokenizer has no pad token (decoder-only checkpoints often ship without one); a
    tokenizer with neither, or a causal LM's without eos (every text ends with it), is a ConfigError."""
    where = f"model.path: the tokenizer of {cfg.path}"
    if tokenizer.pad_token is None and tokenizer.eos_token is None:
        need = '"pad_token" (and "eos_token")' if task == "causal_lm" else '"pad_token"'
        raise ConfigError(f"{where} has no pad token and no eos token: set {need} in its tokenizer_config.json")
    if task == "causal_lm" and tokenizer.eos_token is None:
        raise ConfigError(
            f'{where} has no eos token (every text ends with one): set "eos_token" in its tokenizer_config.json'
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _synthetic(cfg: ModelConfig, task: str, num_labels: int | None) -> Loaded:
    from tether.synthetic import char_tokenizer, tiny_model

    s = cfg.synthetic
    tok = char_tokenizer()
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    try:
        model = tiny_model(
            s.arch, task, len(tok), hidden_size=s.hidden_size, num_layers=s.num_layers, num_heads=s.num_heads,
            seed=s.seed, num_labels=num_labels or 2, **ids,
        )  # fmt: skip
    except ValueError as e:
        raise ConfigError(f"model.synthetic: {e}") from None
    return Loaded(model.to(DTYPES[cfg.dtype]), tok)  # built whole: the synthetic world calls it pre-trained


# What a saved tokenizer leaves in its folder: save_pretrained writes tokenizer_config.json (a fast tokenizer also
# tokenizer.json); older saves hold only their vocabulary (vocab.json + merges.txt, vocab.txt, a sentencepiece .model).
TOKENIZER_FILES = ("tokenizer*.json", "vocab.*", "merges.txt", "*.model", "*.tiktoken")


def _auto_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    folder = Path(cfg.path)
    # Without these files most architectures' tokenizer classes load empty (no vocabulary) instead of failing.
    if folder.is_dir() and not any(next(folder.glob(p), None) for p in TOKENIZER_FILES):
        raise ConfigError(
            f"model.path: {folder} has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file): "
            f"save it there with tokenizer.save_pretrained('{folder}'), or copy in the tokenizer files of the model "
            "it was fine-tuned from"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load '{cfg.path}': {one_line(e)}") from None
    if _special_only(tokenizer):
        raise ConfigError(
            f"model.path: the tokenizer in {cfg.path} has no vocabulary, only its special tokens: save the whole "
            f"tokenizer there with tokenizer.save_pretrained('{cfg.path}')"
        )
    return tokenizer


def _special_only(tokenizer: Any) -> bool:
    """Whether the tokenizer knows its special tokens and nothing else: what most tokenizer classes load from a
    folder with a tokenizer_config.json and no vocabulary."""
    try:
        vocabulary = tokenizer.get_vocab()
    except NotImplementedError:  # a remote-code tokenizer may not list its vocabulary
        return False
    return set(vocabulary) <= set(tokenizer.all_special_tokens)


def _pretrained(cfg: ModelConfig, task: str, num_labels: int | None) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code is on: code shipped with %s will run on this machine", cfg.path)
    kwargs = {"trust_remote_code": cfg.trust_remote_code, "dtype": DTYPES[cfg.dtype], "output_loading_info": True}
    tokenizer = _auto_tokenizer(cfg)
    try:
        if task == "causal_lm":
            model, info = AutoModelForCausalLM.from_pretrained(cfg.path, **kwargs)
        else:
            classes = {} if num_labels is None else {"num_labels": num_labels}  # None: the checkpoint's own
            model, info = AutoModelForSequenceClassification.from_pretrained(cfg.path, **classes, **kwargs)
    except (OSError, ValueError) as e:
        if "Unrecognized configuration class" in str(e):  # the architecture has no model for this task
            raise ConfigError(f"task: transformers has no {task} model for '{cfg.path}': {one_line(e)}") from None
        raise ConfigError(f"model.path: cannot load '{cfg.path}': {one_line(e)}") from None
    new = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    return Loaded(model, tokenizer, frozenset(new & {n for n, _ in model.named_parameters()}))


def apply_lora(
    model: nn.Module, cfg: LoraSection, task: str, calibration: Iterable[dict[str, torch.Tensor]] | None = None
) -> nn.Module:
    """Wrap the model in a fresh PEFT LoRA adapter; only the adapter (and a classifier head) trains. With lora.init
    corda_*, `calibration` yields the rows (one per batch) CorDA builds each layer's input covariance from.

    With `all-linear`, tether also adapts what PEFT's own `all-linear` leaves out or refuses:
      - fused experts: MoE models keep each layer's experts as 3-D tensors (transformers 5: mixtral, qwen2_moe,
        qwen3_moe `experts.gate_up_proj`), which are no nn.Linear; they are adapted per expert (PEFT's
        target_parameters). PEFT cannot put dropout before a fused expert's adapter, so those adapters run without
        it and every nn.Linear adapter gets `lora.dropout` (the saved adapter_config.json says lora_dropout 0);
      - classification heads: PEFT trains the head whole (modules_to_save, every module whose name ends in
        classifier or score), so such modules get no adapter (DistilBERT's pre_classifier would get both).
    Any other refusal by PEFT is one line naming the lora field to change.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    task_type = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS
    all_linear = cfg.target_modules == "all-linear"
    experts = sorted({name for _, name in fused_experts(model)}) if all_linear else []
    extra: dict[str, Any] = {"target_parameters": experts} if experts else {}
    if all_linear and task_type == TaskType.SEQ_CLS:
        extra["exclude_modules"] = rf".*({'|'.join(SEQ_CLS_HEAD_NAMES)})"
    lora = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0 if experts else cfg.dropout,
        target_modules=cfg.target_modules, task_type=task_type, **extra,
    )  # fmt: skip
    try:
        if cfg.init != "default":
            lora = corda_init(model, lora, cfg, calibration)
        wrapped = get_peft_model(model, lora)
    except (ValueError, TypeError, RuntimeError) as e:
        first = one_line(e)
        field = "lora.dropout" if "dropout" in first else "lora.target_modules"
        hint = "list the modules to adapt" if field == "lora.target_modules" else "set it to 0, or use all-linear"
        raise ConfigError(f"{field}: PEFT refuses this model's LoRA: {first}: {hint}") from None
    if experts:
        restore_lora_dropout(wrapped, cfg.dropout)
    left = sorted({name for name, _ in fused_experts(wrapped)})
    if left:
        log.warning("lora: the fused expert weights %s get no adapter (lora.target_modules)", ", ".join(left))
    return wrapped


def apply_osf(model: nn.Module, cfg: OsfSection, task: str) -> nn.Module:
    """Wrap the model in a fresh PEFT OSF adapter (orthogonal subspace fine-tuning, arXiv 2504.07097): each target
    nn.Linear weight is split by its SVD, the top `effective_rank` directions stay frozen and the rest train, PEFT's
    gradient hooks projecting their gradients off the frozen directions; the outputs are unchanged at the start. As
    apply_lora: under all-linear a classifier head is trained whole, not adapted. What would leave a target untrained
    is one line: a target that is no nn.Linear (GPT-2's Conv1D), a layer with no direction left to train."""
    from peft import OSFConfig, TaskType, get_peft_model
    from peft.tuners.osf.layer import OSFLayer
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    task_type = TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS
    osf = OSFConfig(effective_rank=cfg.effective_rank, target_modules=cfg.target_modules, task_type=task_type)
    if cfg.target_modules == "all-linear" and task_type == TaskType.SEQ_CLS:  # OSFConfig has no exclude_modules
        osf = _maybe_include_all_linear_layers(osf, model)
        head = re.compile(rf".*({'|'.join(SEQ_CLS_HEAD_NAMES)})")
        osf.target_modules = {name for name in osf.target_modules if not head.fullmatch(name)}
    try:
        wrapped = get_peft_model(model, osf)
    except (ValueError, TypeError, RuntimeError) as e:
        first = one_line(e)
        raise ConfigError(
            f"osf: PEFT refuses this model's OSF: {first}: change osf.target_modules or effective_rank"
        ) from None
    config = wrapped.peft_config[wrapped.active_adapter]
    modules = list(wrapped.get_base_model().named_modules())
    skipped = [
        n
        for n, m in modules
        if check_target_module_exists(config, n)
        and not isinstance(m, OSFLayer)
        and not re.search(r"\.(modules_to_save|original_module)\b", n)  # a head PEFT trains whole
    ]
    if skipped:
        raise ConfigError(
            f"osf.target_modules: PEFT's OSF adapts nn.Linear layers only, not {skipped[0]} "
            f"({type(dict(modules)[skipped[0]]).__name__}): list nn.Linear modules, or use lora"
        )
    full = [
        n
        for n, m in modules
        if isinstance(m, OSFLayer) and m.osf_svd_params[wrapped.active_adapter]["S_low"].numel() == 0
    ]
    if full:
        raise ConfigError(
            f"osf.effective_rank {cfg.effective_rank} freezes every direction of {full[0]}: nothing would train "
            "there: lower it (a fraction applies to each weight's own size)"
        )
    left = sorted({name for name, _ in fused_experts(wrapped)})
    if left:
        log.warning(
            "osf: the fused expert weights %s get no adapter and stay frozen (OSF adapts nn.Linear)", ", ".join(left)
        )
    return wrapped


def is_osf(model: nn.Module) -> bool:
    """Whether the model is a PEFT model whose active adapter is OSF (saved merged: see merged_osf)."""
    from tether.reference import is_peft

    if not is_peft(model):
        return False
    from peft import PeftType

    return model.peft_config[model.active_adapter].peft_type == PeftType.OSF


def merged_osf(model: nn.Module) -> nn.Module:
    """The trained model as a plain transformers model: PEFT's merge_and_unload (each weight plus its OSF change) on a
    copy, so that the trained model keeps its adapter. OSF's adapter holds as many values as the weights it adapts
    and its reload redoes their SVDs (whose signs a device may flip), so the merged model is what a user loads."""
    return copy.deepcopy(model).merge_and_unload()


def corda_init(model: nn.Module, lora: Any, cfg: LoraSection, calibration: Iterable[dict] | None) -> Any:
    """The LoRA config for CorDA (PEFT's preprocess_corda): the model runs the calibration rows one at a time (its
    covariance hook takes one row per forward) and each target layer gets its SVD; get_peft_model then builds the
    adapters from it and moves their part out of the base weights."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    if calibration is None:
        raise ConfigError(f"lora.init {cfg.init}: CorDA needs calibration rows: give data.reference or training rows")
    if lora.target_parameters:
        raise ConfigError(f"lora.init {cfg.init}: CorDA adapts nn.Linear layers only, not fused experts: use default")
    lora.init_lora_weights = "corda"
    lora.corda_config = CordaConfig(corda_method=cfg.init.removeprefix("corda_"))
    lora = _maybe_include_all_linear_layers(lora, model)  # preprocess_corda reads the names; all-linear, resolved
    rows = list(islice(calibration, cfg.calibration_rows))
    if not rows:
        raise ConfigError(f"lora.init {cfg.init}: no calibration rows (data.reference held-out rows are empty)")

    @torch.no_grad()
    def run_model() -> None:
        for row in rows:
            model(**row)

    was_training = model.training
    try:
        preprocess_corda(model, lora, run_model=run_model)
    finally:
        model.train(was_training)
    return lora


def fused_experts(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, parameter name) of the 3-D weights that modules of the model itself hold directly (fused MoE
    experts), not wrapped by a LoRA adapter; torch's own layers (conv kernels) are not experts."""
    from tether.reference import is_peft

    wrapped = set()
    if is_peft(model):
        from peft.tuners.lora.layer import ParamWrapper

        modules = model.named_modules()
        wrapped = {(unwrapped(name), m.parameter_name) for name, m in modules if isinstance(m, ParamWrapper)}
    out = []
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.") or ".lora_" in f".{name}":
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.ndim == 3 and (unwrapped(name), p_name) not in wrapped:
                out.append((name, p_name))
    return out


def unwrapped(name: str) -> str:
    """A module's name without the `.base_layer` parts that PEFT's (nested) wrappers add at its end."""
    while name.endswith(".base_layer"):
        name = name.removesuffix(".base_layer")
    return name


def restore_lora_dropout(model: nn.Module, rate: float) -> None:
    """Give each nn.Linear adapter its lora.dropout (built without it because fused experts cannot take one)."""
    from peft.tuners.lora.layer import Linear

    if rate:
        for module in model.modules():
            if isinstance(module, Linear):
                for name in module.lora_dropout:
                    module.lora_dropout[name] = nn.Dropout(rate)
