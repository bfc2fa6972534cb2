"""The ``hardwire`` command line: parses arguments and calls library functions.

Every user error is a :class:`~hardwire.compiler.errors.HardwireError`, printed as one line
``hardwire: error: ...`` with exit status 2 and no traceback.
"""

import argparse
import json
import shlex
import sys

from hardwire.compiler.errors import HardwireError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, no usage dump: the user asked for --help if they want it
        raise HardwireError(f"{self.prog}: {message}")


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return v


def _add_model_args(p, *, seq_len=True):
    p.add_argument("model", help="llama2.c .bin, GGUF file, or Hugging Face directory")
    if seq_len:
        p.add_argument("--seq-len", type=_positive_int, default=None,
                       help="cap the context length (default: the model's)")


_LORA_SHORT = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w1", "up": "w3",
               "down": "w2"}


def _add_qat_arg(p):
    p.add_argument("--qat", action="store_true",
                   help="quantize after fine-tuning the weights through the quantizer by "
                        "distillation from the float model (same hardware, other weights; "
                        "about a minute on stories260K; see docs/numerics.md)")


def _add_lora_build_args(p):
    p.add_argument("--lora-targets", default=None,
                   help="build a LoRA datapath for these projections: any of q,k,v,o,gate,up,"
                        "down (or wq..w3); default none (no LoRA hardware)")
    p.add_argument("--lora-rank", type=_positive_int, default=None,
                   help="LoRA SRAM rank r_max, a power of two (8; needs --lora-targets)")


def _lora_spec(args):
    """The :class:`~hardwire.compiler.chip_builder.LoraSpec` of ``--lora-targets`` and
    ``--lora-rank``, or None."""
    targets, rank = getattr(args, "lora_targets", None), getattr(args, "lora_rank", None)
    if targets is None:
        if rank is not None:
            raise HardwireError("--lora-rank needs --lora-targets")
        return None
    from hardwire.compiler.chip_builder import LoraSpec
    names = [t.strip() for t in targets.split(",") if t.strip()]
    bad = [t for t in names if t not in _LORA_SHORT and t not in _LORA_SHORT.values()]
    if bad or not names:
        raise HardwireError(f"--lora-targets: unknown projection {bad[0] if bad else '(none)'!r}"
                            f" (q, k, v, o, gate, up, down)")
    try:
        return LoraSpec(targets=tuple(_LORA_SHORT.get(t, t) for t in names),
                        r_max=8 if rank is None else rank)
    except ValueError as e:
        raise HardwireError(f"--lora-rank: {e}") from None


def _lora_kw(fn, args, command):
    """``{"lora": spec}`` for ``fn`` when LoRA was asked for (and ``fn`` takes it)."""
    import inspect
    spec = _lora_spec(args)
    if spec is None:
        return {}
    if "lora" not in inspect.signature(fn).parameters:
        raise HardwireError(f"{command} --lora-targets: not supported by this build's "
                            f"{fn.__module__}.{fn.__name__} yet")
    return {"lora": spec}


def _build_parser():
    ap = _Parser(prog="hardwire", description="Compile a Llama checkpoint into a chip.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("inspect", help="config, parameter count, ROM bits per weight width")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("run", help="greedy generation with the float, golden or RTL engine")
    _add_model_args(p)
    p.add_argument("--tokenizer", help="llama2.c tokenizer.bin (default: next to the model, "
                   "or the GGUF's own vocabulary)")
    p.add_argument("--prompt", default="", help="prompt text (default: start from BOS)")
    p.add_argument("-n", type=_positive_int, default=64, help="tokens to generate (64)")
    p.add_argument("--engine", choices=("float", "golden", "rtl"), default="float")
    p.add_argument("--wbits", default="8", help="weight widths for golden/rtl: 8, 4, 3/6, "
                   "or '4,embed=8' (default 8)")
    _add_qat_arg(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--clock-mhz", type=_positive_float, default=50.0,
                   help="clock for the tokens/s estimate of the rtl engine (50)")
    p.add_argument("--trace", help="rtl engine: write a waveform (.fst or .vcd)")
    p.add_argument("--fold", default=None, help="rtl engine: folding (see compile --help)")
    p.add_argument("--build-dir", default="build", help="where simulations are cached")
    p.add_argument("--lora", default=None,
                   help="PEFT adapter folder: merged (float), integer LoRA path (golden), or "
                        "uploaded into the chip's LoRA SRAM (rtl; the chip is built with the "
                        "adapter's targets and rank unless --lora-targets/--lora-rank say "
                        "otherwise)")
    _add_lora_build_args(p)

    p = sub.add_parser("lora", help="LoRA adapters: pack a PEFT adapter into a chip image")
    lsub = p.add_subparsers(dest="lora_command", metavar="ACTION", parser_class=_Parser,
                            required=True)
    lp = lsub.add_parser("pack", help="validate and quantize a PEFT adapter into image.bin")
    lp.add_argument("adapter", help="PEFT adapter folder (adapter_config.json + safetensors)")
    lp.add_argument("--model", required=True, help="the base model the chip was compiled from")
    lp.add_argument("--wbits", default="8", help="the chip's weight widths")
    lp.add_argument("--qat", action="store_true",
                    help="the chip was compiled with --qat (its base weights)")
    lp.add_argument("-o", "--out", required=True, help="image file to write")
    lp = lsub.add_parser("load", help="upload an image into a board's LoRA bank and commit it")
    lp.add_argument("image", help="adapter image (hardwire lora pack)")
    lp.add_argument("--port", required=True, help="serial port of the board or board-sim pty")
    lp.add_argument("--baud", type=_positive_int, default=115200, help="baud rate (115200)")
    lp.add_argument("--commit", action=argparse.BooleanOptionalAction, default=True,
                    help="commit after the upload (default); --no-commit only uploads")
    lp.add_argument("--enable", action=argparse.BooleanOptionalAction, default=True,
                    help="switch the adapter on after the commit (default)")
    lp.add_argument("--lock", action="store_true",
                    help="lock the loader afterwards: no further uploads until reset")
    lp.add_argument("--timeout", type=_positive_float, default=10.0,
                    help="seconds to wait for each reply (10)")
    lp.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("quantize", help="quantize and report agreement with the float model")
    _add_model_args(p)
    p.add_argument("--tokenizer", help="tokenizer for the report prompts")
    p.add_argument("--wbits", default="8", help="weight widths (8, 4, 3, 3/6, '4,embed=8')")
    _add_qat_arg(p)
    p.add_argument("--report", action="store_true", help="run the quality report")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-n", type=_positive_int, default=128,
                   help="tokens generated per report prompt (128)")

    p = sub.add_parser("compile", help="emit the chip: Verilog, RTLIL and report.json")
    _add_model_args(p)
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--wbits", default="8", help="weight widths (8, 4, 3/6, '4,embed=8')")
    _add_qat_arg(p)
    p.add_argument("--fold", default=None,
                   help="folding, e.g. 'pe=4,simd=8' or 'wq=8x8,w2=4x4,attn=2'; "
                        "'layers=shared' builds one decoder unit for every layer (default: "
                        "planned, a unit per layer)")
    p.add_argument("--target-cycles", type=_positive_int, default=None,
                   help="planner: aim for this many cycles per matrix")
    p.add_argument("--mac-budget", type=_positive_int, default=None,
                   help="planner: at most this many multipliers in all")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    _add_lora_build_args(p)

    p = sub.add_parser("synth", help="FPGA bitstream of the chip on a board, with resource "
                       "and speed report (synth.json)")
    _add_model_args(p)
    p.add_argument("--board", default="ulx3s-85f", help="target board (ulx3s-85f)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--wbits", default="8", help="weight widths (8, 4, 3/6, '4,embed=8')")
    _add_qat_arg(p)
    p.add_argument("--fold", default=None, help="folding (see compile --help; default: the "
                   "planner's, folded further until it fits the FPGA: multipliers, block "
                   "RAM, flip-flops)")
    p.add_argument("--clock-mhz", type=_positive_float, default=50.0,
                   help="design clock made by the PLL from 25 MHz (50)")
    p.add_argument("--baud", type=_positive_int, default=115200, help="UART baud rate (115200)")
    p.add_argument("--lut-mapper", choices=("auto", "abc9", "abc"), default="auto",
                   help="Yosys LUT mapping (auto: abc9, falling back to abc)")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placement seed (1)")
    p.add_argument("--nextpnr-args", default="", metavar="ARGS",
                   help="extra nextpnr-ecp5 options, one shell-quoted string (e.g. "
                   "--nextpnr-args='--no-tmdriv'; the router is router2 unless they "
                   "name one)")
    p.add_argument("--json", action="store_true", help="print synth.json to stdout")
    _add_lora_build_args(p)

    p = sub.add_parser("board-sim", help="simulate the whole board (UART, host link, chip); "
                       "its serial port appears as a pty")
    _add_model_args(p)
    p.add_argument("--wbits", default="8", help="weight widths (8, 4, 3/6, '4,embed=8')")
    _add_qat_arg(p)
    p.add_argument("--fold", default=None, help="folding (see compile --help)")
    p.add_argument("--baud-divisor", type=_positive_int, default=8,
                   help="clocks per UART bit in the simulation (8)")
    p.add_argument("--build-dir", default="build", help="where simulations are cached")
    _add_lora_build_args(p)

    p = sub.add_parser("chat", help="generate text on a board or a board-sim pty")
    p.add_argument("--port", required=True, help="serial port (/dev/ttyUSB0, or the pty "
                   "printed by board-sim)")
    p.add_argument("--tokenizer", help="llama2.c tokenizer.bin (needed for --prompt and text)")
    p.add_argument("--prompt", default="", help="prompt text (default: start from BOS)")
    p.add_argument("-n", type=_positive_int, default=64, help="tokens to generate (64)")
    p.add_argument("--baud", type=_positive_int, default=115200, help="baud rate (115200)")
    p.add_argument("--timeout", type=_positive_float, default=10.0,
                   help="seconds to wait for each reply (10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    return ap


def _cmd_synth(args):
    from hardwire.fpga.synth import format_summary, synth_board
    try:
        nextpnr_opts = tuple(shlex.split(args.nextpnr_args))
    except ValueError as e:
        raise HardwireError(f"--nextpnr-args: {e}") from None
    reserved = {"--json", "--textcfg", "--lpf", "--log", "--report", "--seed", "--freq",
                "--package", "--speed", "--write", "--out-of-context"}
    if bad := sorted(set(o.split("=")[0] for o in nextpnr_opts) & reserved):
        raise HardwireError(f"--nextpnr-args: {', '.join(bad)} is set by hardwire synth")
    rep = synth_board(args.model, args.out, board=args.board, wbits=args.wbits, qat=args.qat,
                      seq_len=args.seq_len, fold=args.fold, clock_mhz=args.clock_mhz,
                      baud=args.baud, seed=args.seed, lut_mapper=args.lut_mapper,
                      nextpnr_opts=nextpnr_opts,
                      progress=not args.json, **_lora_kw(synth_board, args, "synth"))
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(format_summary(rep))
        print(f"wrote {rep['bitstream']} and {args.out}/synth.json")


def _cmd_board_sim(args):
    from hardwire.fpga.board_sim import run_board_sim
    run_board_sim(args.model, wbits=args.wbits, qat=args.qat, seq_len=args.seq_len,
                  fold=args.fold,
                  cpb=args.baud_divisor, build_dir=args.build_dir,
                  **_lora_kw(run_board_sim, args, "board-sim"))


def _cmd_chat(args):
    from hardwire.fpga.host import chat

    def show(piece):
        print(piece, end="", flush=True)
    result = chat(args.port, tokenizer=args.tokenizer, prompt=args.prompt, n=args.n,
                  baud=args.baud, timeout=args.timeout, on_text=None if args.json else show)
    if args.json:
        print(json.dumps(result))
    else:
        print()
        print(f"[{len(result['tokens'])} tokens in {result['seconds']:.2f} s, "
              f"{result['tokens_per_s']:,.1f} tokens/s over the link]", file=sys.stderr)


def _cmd_compile(args):
    from hardwire.compiler.emit import compile_model, format_report
    rep = compile_model(args.model, args.out, wbits=args.wbits, qat=args.qat,
                        seq_len=args.seq_len,
                        fold=args.fold, target_cycles=args.target_cycles,
                        mac_budget=args.mac_budget, progress=None if args.json else sys.stderr,
                        **_lora_kw(compile_model, args, "compile"))
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(format_report(rep))
        print("wrote " + ", ".join(rep["files"]) + f" in {rep['seconds']:.1f} s")


def _cmd_inspect(args):
    from hardwire.compiler import api
    info = api.inspect_model(args.model, seq_len=args.seq_len)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(api.format_inspect(info))


def _cmd_run(args):
    from hardwire.compiler import api
    result = api.run_generation(
        args.model, tokenizer=args.tokenizer, prompt=args.prompt, n=args.n, engine=args.engine,
        wbits=args.wbits, qat=args.qat, seq_len=args.seq_len, clock_mhz=args.clock_mhz,
        trace=args.trace,
        fold=args.fold, build_dir=args.build_dir, lora=args.lora,
        progress=None if args.json else sys.stderr, **_lora_build_kw(api.run_generation, args))
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
        if "cycles" in result:
            print(api.format_cycles(result), file=sys.stderr)


def _lora_build_kw(fn, args):
    """``run``: the chip's LoRA build (``lora_spec=``) for the rtl engine, when asked for."""
    import inspect
    spec = _lora_spec(args)
    if spec is None:
        return {}
    if "lora_spec" not in inspect.signature(fn).parameters:
        raise HardwireError("run --lora-targets: not supported by this build's rtl engine")
    return {"lora_spec": spec}


def _cmd_quantize(args):
    from hardwire.compiler import api
    if not args.report:
        info = api.quantize_summary(args.model, wbits=args.wbits, seq_len=args.seq_len,
                                    qat=args.qat)
        print(json.dumps(info, indent=2) if args.json else api.format_quantize(info))
        return
    rep = api.quality_report(args.model, wbits=args.wbits, tokenizer=args.tokenizer,
                             n=args.n, seq_len=args.seq_len, qat=args.qat)
    print(json.dumps(rep, indent=2) if args.json else api.format_quality(rep))


def _cmd_lora(args):
    if args.lora_command == "load":
        return _cmd_lora_load(args)
    from hardwire.compiler.loaders import load_model
    from hardwire.compiler.lora_image import pack_lora, write_image
    model = load_model(args.model)
    data = pack_lora(args.adapter, model, wbits=args.wbits, qat=args.qat)
    write_image(args.out, data)
    print(f"wrote {args.out} ({len(data):,} bytes)")


def _cmd_lora_load(args):
    from hardwire.fpga.host import lora_load

    shown = []

    def progress(sent, total):
        shown.append(sent)
        print(f"\ruploading {sent:,}/{total:,} bytes", end="", file=sys.stderr, flush=True)
    try:
        res = lora_load(args.port, args.image, baud=args.baud, timeout=args.timeout,
                        commit=args.commit, enable=args.enable, lock=args.lock,
                        progress=None if args.json else progress)
    finally:
        if shown:
            print(file=sys.stderr)
    if args.json:
        print(json.dumps(res))
        return
    st, h = res["status"], res["header"]
    print(f"{res['image']}: {h['bytes']:,} bytes, {h['n_layers']} layers, "
          f"{','.join(h['targets'])}, rank {h['rank']}/{h['r_max']}, "
          f"{res['bytes_per_s']:,.0f} B/s")
    state = "committed" if res["committed"] else "uploaded, not committed"
    print(f"{state}: active bank {st['bank']}, adapter {'on' if st['on'] else 'off'}"
          f"{', switch pending' if st['pending'] else ''}{', locked' if st['locked'] else ''}")


COMMANDS = {"lora": _cmd_lora, "inspect": _cmd_inspect, "run": _cmd_run, "quantize": _cmd_quantize,
            "compile": _cmd_compile, "synth": _cmd_synth, "board-sim": _cmd_board_sim,
            "chat": _cmd_chat}


def main(argv=None):
    ap = _build_parser()
    try:
        args = ap.parse_args(argv)
        if not args.command:
            ap.print_help()
            return 2
        COMMANDS[args.command](args)
    except HardwireError as e:
        print(f"hardwire: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hardwire: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
