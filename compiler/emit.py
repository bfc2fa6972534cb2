"""Emission: a quantized model and a plan become Verilog, RTLIL and a report.

Everything written is a pure function of the model file and the options (no timestamps, no
durations), so re-running gives byte-identical files. Output appears all at once: files are
written to a temporary folder beside ``out_dir`` and moved into place only when complete.
"""

import json
import shutil
import time
from pathlib import Path

from .chip_builder import build_chip, chip_name
from .errors import HardwireError
from .loaders import load_model
from .plan import attention_mac_units, mac_units, plan_chip, predict_cycles
from .quantize import quantize_model, wbits_label
from .rtlil_fast import fast_amaranth

__all__ = [
    "REPORT_POSITIONS",
    "chip_report",
    "chip_rtlil",
    "compile_model",
    "convert_verilog",
    "format_report",
    "rtlil_to_verilog",
]

# positions at which the report gives cycles per token (attention grows with the context)
REPORT_POSITIONS = (0, 1, 15, 63, 127, 255, 511, 1023, 2047, 4095, 8191)


def chip_report(qm, plan, *, name):
    c = qm.config
    rom = qm.rom_bits()
    macs_per_token = sum(int(m.q.size) for L in qm.layers
                         for m in (L.wq, L.wk, L.wv, L.wo, L.w1, L.w3, L.w2))
    macs_per_token += int(qm.classifier.q.size)
    units = {"matrices": mac_units(plan), "attention": attention_mac_units(plan)}
    units["total"] = units["matrices"] + units["attention"]
    by_pos = {}
    for pos in REPORT_POSITIONS:
        if pos >= c.seq_len:
            continue
        cyc = predict_cycles(qm, plan, pos)
        # attention MACs: scores and weighted sums over pos+1 positions, every head
        att = 2 * c.n_layers * c.n_heads * c.head_size * (pos + 1)
        by_pos[str(pos)] = {"cycles": cyc, "mac_utilization":
                            (macs_per_token + att) / (units["total"] * cyc["total"])}
    return {
        "name": name, "model_hash": qm.model_hash, "datapath_digest": qm.digest(),
        "config": c.to_dict(), "wbits": qm.wbits, "wbits_label": wbits_label(qm.wbits),
        "quantization": qm.method,
        "numerics": {"act_bits": qm.numerics.act_bits, "qkv_bits": qm.numerics.qkv_bits,
                     "resid_bits": qm.numerics.resid_bits, "resid_frac": qm.resid_frac,
                     "silu_bits": qm.numerics.silu_bits},
        "rom_bits": rom, "rom_bits_total": int(sum(rom.values())),
        "kv_cache_bits": int(2 * c.n_layers * c.seq_len * c.kv_dim * qm.numerics.qkv_bits),
        "plan": _plan_dict(plan), "mac_units": units,
        "macs_per_token_matrices": macs_per_token,
        "cycles_per_token": by_pos,
    }


def lora_report(chip, lora):
    """The ``lora`` section of report.json for a chip built with ``lora``: what the SRAM
    holds and what the adapter adds to a token (from the chip's cycle formulas, which the
    LoRA chip bench checks against RTL simulation)."""
    from ..hdl.lora import LoraProjection
    units = [(k, n, layer._blocks[n]) for k, layer in enumerate(chip.layers)
             for n in layer.lora_targets]
    by_pos = {}
    for pos in REPORT_POSITIONS:
        if pos < chip.seq_len:
            on, off = chip.cycles_per_token(pos), chip.cycles_per_token(pos, lora_on=False)
            by_pos[str(pos)] = {"lora_on": on, "lora_off": off, "added": on - off}
    assert all(isinstance(u, LoraProjection) for _k, _n, u in units)
    return {
        "targets": list(lora.targets), "r_max": lora.r_max, "simd": lora.simd,
        "image_bytes": int(chip.id_words[20]),      # ID ROM word 20: the image length
        "sram_bits": int(sum(u.lora.sram_bits for _k, _n, u in units)),
        "sram_bits_by_unit": {f"L{k}.{n}": int(u.lora.sram_bits) for k, n, u in units},
        "mac_units": int(sum(u.lora.mac_units for _k, _n, u in units)),
        "cycles_per_token": by_pos,
    }


def _plan_dict(plan):
    return {
        "matrices": {k: {"pe": f.pe, "simd": f.simd, "form": f.form, "steps": f.steps}
                     for k, f in plan.matrices.items()},
        "head_lanes": plan.head_lanes, "norm_lanes": plan.norm_lanes,
        "rope_lanes": plan.rope_lanes, "swiglu_lanes": plan.swiglu_lanes,
        "embed_lanes": plan.embed_lanes, "argmax_lanes": plan.argmax_lanes,
        "layers": "shared" if plan.shared_layers else "dedicated",
        "summary": plan.summary().splitlines(),
    }


def format_report(rep):
    c = rep["config"]
    first = rep["cycles_per_token"]["0"]
    last_pos = max(rep["cycles_per_token"], key=int)
    last = rep["cycles_per_token"][last_pos]
    worst = max(((k, v) for k, v in first["cycles"].items() if k != "total"),
                key=lambda kv: kv[1])
    lora = rep.get("lora")
    extra = [] if lora is None else [
        f"  LoRA {','.join(lora['targets'])} r_max {lora['r_max']}: {lora['sram_bits']:,} SRAM "
        f"bits (two banks), image {lora['image_bytes']:,} bytes, +{lora['mac_units']} MAC units, "
        f"+{lora['cycles_per_token']['0']['added']} cycles/token with the adapter on"]
    return "\n".join([
        f"{rep['name']}: {c['n_layers']} layers, dim {c['dim']}, context {c['seq_len']}, "
        f"weights {rep['wbits_label']}-bit",
        f"  weight ROM {rep['rom_bits_total']:,} bits, KV cache {rep['kv_cache_bits']:,} bits, "
        f"{rep['mac_units']['total']} MAC units",
        f"  cycles/token: {first['cycles']['total']:,} at position 0, "
        f"{last['cycles']['total']:,} at position {last_pos}; largest unit at position 0: "
        f"{worst[0]} ({worst[1]:,})",
        f"  MAC utilization {100 * first['mac_utilization']:.1f}% (pos 0), "
        f"{100 * last['mac_utilization']:.1f}% (pos {last_pos})",
    ] + extra)


def compile_model(path, out_dir, *, wbits="8", seq_len=None, fold=None, target_cycles=None,
                  mac_budget=None, lora=None, progress=None, qat=False):
    """Compile a model file into ``out_dir/<name>.v``, ``.il`` and ``report.json``.

    ``lora`` (a :class:`~.chip_builder.LoraSpec`) adds the LoRA SRAM block to each target
    matrix; the name gets a ``_lora_<targets>_r<r_max>`` suffix and the report a ``lora``
    section (targets, rank, image bytes, SRAM bits, cycles per token with the adapter on).

    ``qat`` quantizes with :mod:`.qat` fine-tuning first (``--qat``; the report's
    ``quantization`` says ``gptq-clip+qat``).

    The returned report also holds ``seconds`` (wall time) and ``stage_seconds`` (load,
    quantize, plan, build, rtlil, verilog); neither is written to ``report.json``.
    """
    def say(msg):
        if progress is not None:
            print(f"[hardwire] {msg}", file=progress, flush=True)

    stages = {}
    t0 = last = time.perf_counter()

    def lap(stage):
        nonlocal last
        now = time.perf_counter()
        stages[stage] = round(now - last, 3)
        last = now

    model = load_model(path, seq_len=seq_len)
    lap("load")
    qm = quantize_model(model, wbits=wbits, qat=qat)
    lap("quantize")
    try:
        plan = plan_chip(qm, fold=fold, target_cycles=target_cycles, mac_budget=mac_budget)
    except ValueError as e:
        raise HardwireError(f"{e}") from None
    lap("plan")
    say(f"quantized {model.name} ({wbits_label(qm.wbits)}-bit weights) and planned in "
        f"{time.perf_counter() - t0:.1f} s")
    name = chip_name(qm, lora=lora)
    try:
        chip = build_chip(qm, plan, lora=lora)
    except ValueError as e:
        raise HardwireError(f"{path}: {e}") from None
    lap("build")
    il_text = chip_rtlil(chip, name=name)
    lap("rtlil")
    say(f"elaborated and emitted RTLIL in {stages['build'] + stages['rtlil']:.1f} s")
    v_text = rtlil_to_verilog(il_text)
    lap("verilog")
    say(f"converted RTLIL to Verilog in {stages['verilog']:.1f} s")
    rep = chip_report(qm, plan, name=name)
    if lora is not None:
        rep["lora"] = lora_report(chip, lora)

    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / f"{name}.v").write_text(v_text)
    (tmp / f"{name}.il").write_text(il_text)
    (tmp / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    lap("write")
    rep["seconds"] = round(time.perf_counter() - t0, 2)
    rep["stage_seconds"] = stages
    rep["files"] = [str(out / f"{name}.v"), str(out / f"{name}.il"), str(out / "report.json")]
    return rep


def chip_rtlil(component, *, name):
    """RTLIL text of ``component`` (elaborated once), exactly as ``amaranth.back.rtlil.convert``
    with ``emit_src=False`` and the component's flattened ports, only faster
    (:func:`~.rtlil_fast.fast_amaranth`)."""
    from amaranth.back import rtlil
    with fast_amaranth():
        return rtlil.convert(component, name=name, ports=_ports(component), emit_src=False)


def convert_verilog(component, *, name, ports=None):
    """``amaranth.back.verilog.convert(component, name=name, ports=ports, emit_src=False)``,
    the same text, through :func:`~.rtlil_fast.fast_amaranth` (``ports`` defaults to the
    component's flattened signature)."""
    from amaranth.back import rtlil
    ports = _ports(component) if ports is None else ports
    with fast_amaranth():
        il_text = rtlil.convert(component, name=name, ports=ports, emit_src=False)
    return rtlil_to_verilog(il_text)


def rtlil_to_verilog(il_text):
    """Verilog from RTLIL text with one call of Amaranth's builtin Yosys: the same script as
    ``amaranth.back.verilog.convert`` runs after its own RTLIL conversion, so the text equals
    ``verilog.convert(component, ...)`` without elaborating and converting twice."""
    from amaranth.back.verilog import _convert_rtlil_text
    return _convert_rtlil_text(il_text)


def _ports(component):
    """Every port of a component's signature, flattened (a stream ``o`` becomes ``o__valid``,
    ``o__ready``, ``o__payload``)."""
    from amaranth.hdl import Value
    return [Value.cast(v) for _path, _member, v in component.signature.flatten(component)]
