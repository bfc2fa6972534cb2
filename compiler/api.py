"""Library functions behind the command line (each returns plain data; ``format_*`` makes text).

The CLI only parses arguments and calls these; tests call them directly too.
"""

import math
import time
from pathlib import Path

import numpy as np

from .errors import HardwireError
from .loaders import load_model
from .quantize import parse_wbits, quantize_model, wbits_label
from .tokenizer import BOS, Tokenizer, load_tokenizer

__all__ = ["REPORT_PROMPTS", "find_tokenizer", "format_cycles", "format_inspect",
           "format_quality", "format_quantize", "inspect_model", "quality_report",
           "quantize_summary", "rtl_lora_spec", "run_generation"]

# Prompts of the quality report (none of them is used for calibration).
REPORT_PROMPTS = ("", "Tom and his dog", "The sun was", "Once upon a time, a little boy",
                  "She wanted to")


def inspect_model(path, *, seq_len=None):
    m = load_model(path, seq_len=seq_len)
    c = m.config
    weights = {n: t for n, t in m.tensors.items() if t.ndim == 2}
    n_weights = sum(t.size for t in weights.values())
    return {
        "file": str(path), "name": m.name, "content_hash": m.content_hash(),
        "config": c.to_dict() | {"head_size": c.head_size, "kv_dim": c.kv_dim},
        "parameters": m.n_params, "matrix_parameters": int(n_weights),
        "rom_bits": {str(b): int(n_weights * b) for b in (8, 6, 4, 3)},
        "rom_bits_3_6": _mixed_bits(m, parse_wbits("3/6")),
        "kv_cache_bits_int10": int(2 * c.n_layers * c.seq_len * c.kv_dim * 10),
    }


def _mixed_bits(m, wb):
    from .quantize import CLASS_OF
    total = m.tensors["tok_embeddings"].size * wb["embed"]
    if not m.config.shared_classifier:
        total += m.tensors["output"].size * wb["embed"]
    for i in range(m.config.n_layers):
        for n, cls in CLASS_OF.items():
            total += m.tensors[f"layers.{i}.{n}"].size * wb[cls]
    return int(total)


def format_inspect(info):
    c = info["config"]
    lines = [
        f"{info['name']}  ({info['file']})",
        f"  dim {c['dim']}, layers {c['n_layers']}, heads {c['n_heads']} "
        f"(kv {c['n_kv_heads']}, head size {c['head_size']}), hidden {c['hidden_dim']}, "
        f"vocab {c['vocab_size']}, context {c['seq_len']}, "
        f"classifier {'shared' if c['shared_classifier'] else 'separate'}",
        f"  parameters {info['parameters']:,} ({info['matrix_parameters']:,} in matrices)",
        "  weight ROM: " + ", ".join(f"{b}-bit {v / 8 / 1024:.1f} KiB ({v:,} bits)"
                                     for b, v in info["rom_bits"].items())
        + f", 3/6 mix {info['rom_bits_3_6']:,} bits",
        f"  content hash {info['content_hash'][:16]}",
    ]
    return "\n".join(lines)


def find_tokenizer(model, model_path, tokenizer_path=None):
    """The tokenizer: an explicit file, the GGUF's own vocabulary, or one next to the model."""
    if tokenizer_path:
        return load_tokenizer(tokenizer_path)
    if model.vocab is not None:
        return Tokenizer.from_gguf_vocab(model.vocab, model.vocab_scores,
                                         source=str(model_path))
    p = Path(model_path)
    folder = p if p.is_dir() else p.parent
    for name in (f"tok{model.config.vocab_size}.bin", "tokenizer.bin"):
        if (folder / name).is_file():
            return load_tokenizer(folder / name)
    return None


def _prompt_tokens(tok, prompt, path):
    if tok is None:
        if prompt:
            raise HardwireError(f"{path}: no tokenizer found next to the model; pass "
                                "--tokenizer")
        return [BOS]
    return tok.encode(prompt, bos=True)


def _text(tok, prompt_tokens, tokens):
    if tok is None:
        return " ".join(str(t) for t in tokens)
    return tok.decode_all(list(prompt_tokens[1:]) + list(tokens), prev=BOS)


def rtl_lora_spec(adapter, lora_spec=None):
    """The rtl engine's chip LoRA build for ``adapter``: ``lora_spec`` if given (it must hold
    the adapter: its targets and rank), else the adapter's targets with ``r_max`` the next
    power of two at or above its rank."""
    from .chip_builder import LoraSpec
    where = adapter.source or None
    if lora_spec is None:
        r_max = 1 << max(0, int(adapter.rank) - 1).bit_length()
        try:
            return LoraSpec(targets=adapter.targets, r_max=r_max)
        except ValueError as e:
            raise HardwireError(f"{e}", path=where) from None
    missing = [t for t in adapter.targets if t not in lora_spec.targets]
    if missing:
        raise HardwireError(f"the adapter adapts {', '.join(missing)}, not in --lora-targets "
                            f"({', '.join(lora_spec.targets)})", path=where)
    if adapter.rank > lora_spec.r_max:
        raise HardwireError(f"the adapter's rank r={adapter.rank} is above --lora-rank "
                            f"{lora_spec.r_max}", path=where)
    return lora_spec


def run_generation(path, *, tokenizer=None, prompt="", n=64, engine="float", wbits="8",
                   seq_len=None, clock_mhz=50.0, trace=None, fold=None, build_dir="build",
                   progress=None, lora=None, lora_spec=None, qat=False):
    """Greedy generation; returns a dict with ``prompt_tokens``, ``tokens`` and ``text``.

    ``qat`` (golden and rtl engines) quantizes with :mod:`.qat` fine-tuning first.

    ``lora`` is a PEFT adapter folder: merged into the float model, applied through the
    integer LoRA path of the golden model, or (rtl engine) packed into an HWLA image that
    the simulated chip's loader receives before the first token. ``lora_spec`` (a
    :class:`~.chip_builder.LoraSpec`, rtl engine only) is the chip's LoRA build (default:
    :func:`rtl_lora_spec`); without ``lora`` it builds the LoRA chip and leaves it off.
    """
    m = load_model(path, seq_len=seq_len)
    adapter = None
    if qat and engine == "float":
        raise HardwireError("--qat quantizes the weights: it applies to --engine golden and rtl, "
                            "not float")
    if lora_spec is not None and engine != "rtl":
        raise HardwireError(f"--lora-targets/--lora-rank build the rtl engine's chip; they do "
                            f"not apply to --engine {engine}")
    if lora is not None:
        from .lora import load_peft_adapter
        adapter = load_peft_adapter(lora, m)
        if engine == "rtl":
            lora_spec = rtl_lora_spec(adapter, lora_spec)
    tok = find_tokenizer(m, path, tokenizer)
    pt = _prompt_tokens(tok, prompt, path)
    if len(pt) > m.config.seq_len:
        raise HardwireError(f"prompt of {len(pt)} tokens is longer than the context "
                            f"({m.config.seq_len})")
    t0 = time.perf_counter()
    result = {"engine": engine, "model": m.name, "prompt_tokens": pt}
    if lora is not None:
        result["lora"] = str(lora)
    if engine == "float":
        from .reference import generate_greedy
        if adapter is not None:
            from .lora import apply_lora_float
            m = apply_lora_float(m, adapter)
        out = generate_greedy(m, pt, n)
    elif engine == "golden":
        from .golden import generate_golden
        qm = quantize_model(m, wbits=wbits, qat=qat)
        golden = None
        if adapter is not None:
            from .lora import LoraGoldenModel, quantize_lora
            golden = LoraGoldenModel(qm, quantize_lora(adapter, m, qm))
        out = generate_golden(qm, pt, n, golden=golden)
        result.update(wbits=wbits_label(qm.wbits), quantization=qm.method)
    elif engine == "rtl":
        from hardwire.sim.chip_sim import generate_rtl   # noqa: PLC0415 (optional layer)
        qm = quantize_model(m, wbits=wbits, qat=qat)
        image = None
        if adapter is not None:
            from .lora import quantize_lora
            from .lora_image import image_bytes
            image = image_bytes(quantize_lora(adapter, m, qm, targets=lora_spec.targets,
                                              r_max=lora_spec.r_max), m.config)
        rtl = generate_rtl(qm, pt, n, fold=fold, build_dir=build_dir, trace=trace,
                           progress=progress, lora=lora_spec, lora_image=image)
        out = rtl["tokens"]
        result.update(wbits=wbits_label(qm.wbits), quantization=qm.method, cycles=rtl["cycles"],
                      clock_mhz=clock_mhz)
        if lora_spec is not None:
            result["lora_build"] = {"targets": list(lora_spec.targets),
                                    "r_max": lora_spec.r_max}
        if image is not None:
            result.update(lora_image_bytes=len(image), lora_status=rtl["lora_status"],
                          upload_seconds=round(rtl["upload_seconds"], 3))
    else:
        raise HardwireError(f"unknown engine {engine!r}")
    result["tokens"] = [int(t) for t in out]
    result["text"] = _text(tok, pt, out)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def format_cycles(result):
    cyc = result["cycles"]
    mean = sum(cyc) / max(1, len(cyc))
    tps = result["clock_mhz"] * 1e6 / mean if mean else 0.0
    return (f"[{len(cyc)} tokens, {mean:.0f} cycles/token on average "
            f"(min {min(cyc)}, max {max(cyc)}): {tps:,.0f} tokens/s at "
            f"{result['clock_mhz']:g} MHz]")


def quantize_summary(path, *, wbits="8", seq_len=None, qat=False):
    m = load_model(path, seq_len=seq_len)
    qm = quantize_model(m, wbits=wbits, qat=qat)
    rom = qm.rom_bits()
    return {"model": m.name, "wbits": qm.wbits, "label": wbits_label(qm.wbits),
            "rom_bits": int(sum(rom.values())), "resid_frac": qm.resid_frac,
            "numerics": {"act_bits": qm.numerics.act_bits, "qkv_bits": qm.numerics.qkv_bits,
                         "resid_bits": qm.numerics.resid_bits,
                         "silu_bits": qm.numerics.silu_bits},
            "digest": qm.digest()}


def format_quantize(info):
    return (f"{info['model']}: weights {info['label']} -> {info['rom_bits']:,} ROM bits; "
            f"residual Q{info['numerics']['resid_bits'] - info['resid_frac']}."
            f"{info['resid_frac']}; datapath digest {info['digest'][:16]}")


def _log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max()
    return x - math.log(np.exp(x).sum())


def quality_report(path, *, wbits="8", tokenizer=None, n=128, seq_len=None, prompts=None,
                   qat=False):
    """Float greedy runs from several prompts, then the golden model teacher-forced on them.

    Reports top-1 agreement (golden argmax == float argmax at every position) and the
    cross-entropy of each engine on the float model's own continuation. ``qat``: quantize
    with distillation fine-tuning (:func:`~.quantize.quantize_model`).
    """
    from .golden import GoldenModel
    from .reference import FloatModel, generate_greedy
    m = load_model(path, seq_len=seq_len)
    tok = find_tokenizer(m, path, tokenizer)
    if prompts is None:
        prompts = REPORT_PROMPTS if tok is not None else ()
    if tok is not None:
        starts = [tok.encode(p, bos=True) for p in prompts]
    else:   # no tokenizer: seeded token starts
        rng = np.random.default_rng(1)
        starts = [[BOS]] + [[BOS, int(t)] for t in rng.integers(3, m.config.vocab_size, 4)]
    t0 = time.perf_counter()
    qm = quantize_model(m, wbits=wbits, qat=qat)
    t_quant = time.perf_counter() - t0
    per_prompt = []
    tot_agree = tot_n = 0
    tot_ce_f = tot_ce_g = 0.0
    for p, st in zip(prompts or [None] * len(starts), starts):
        n_gen = max(1, min(n, m.config.seq_len - len(st)))
        seq = st + generate_greedy(m, st, n_gen)
        fm, gm = FloatModel(m), GoldenModel(qm)
        agree = 0
        ce_f = ce_g = 0.0
        for pos in range(len(seq) - 1):
            lf = fm.step(seq[pos], pos)
            lg = gm.step(seq[pos], pos)
            agree += int(np.argmax(lf) == np.argmax(lg))
            ce_f -= _log_softmax(lf)[seq[pos + 1]]
            ce_g -= _log_softmax(gm.float_logits(lg))[seq[pos + 1]]
        k = len(seq) - 1
        per_prompt.append({"prompt": p, "positions": k, "top1_agreement": agree / k,
                           "ce_float": ce_f / k, "ce_golden": ce_g / k})
        tot_agree += agree
        tot_n += k
        tot_ce_f += ce_f
        tot_ce_g += ce_g
    return {
        "model": m.name, "wbits": wbits_label(qm.wbits), "wbits_by_class": qm.wbits,
        "method": qm.method, "positions": tot_n, "top1_agreement": tot_agree / tot_n,
        "ce_float": tot_ce_f / tot_n, "ce_golden": tot_ce_g / tot_n,
        "ce_increase": (tot_ce_g - tot_ce_f) / tot_n,
        "rom_bits": int(sum(qm.rom_bits().values())), "quantize_seconds": round(t_quant, 2),
        "prompts": per_prompt,
    }


def format_quality(rep):
    lines = [f"{rep['model']} W{rep['wbits']} ({rep['method']}): top-1 agreement "
             f"{100 * rep['top1_agreement']:.1f}% over {rep['positions']} positions; "
             f"cross-entropy {rep['ce_float']:.4f} (float) -> {rep['ce_golden']:.4f} "
             f"(golden), +{rep['ce_increase']:.4f} nats/token; ROM {rep['rom_bits']:,} bits"]
    for p in rep["prompts"]:
        lines.append(f"  {p['prompt']!r:34} {100 * p['top1_agreement']:5.1f}%  "
                     f"CE {p['ce_float']:.3f} -> {p['ce_golden']:.3f}")
    return "\n".join(lines)


