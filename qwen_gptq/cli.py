"""Command line: `qwen-gptq quantize | verify | models`.

Flags come from the options dataclasses (options.QuantizeOptions, verify.VerifyOptions),
each under its dash and underscore spellings. Results go to stdout (one JSON object
with --json), progress and logs to stderr. Exit codes: 0 ok, 1 a check or the run
failed, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from types import MappingProxyType
from typing import TextIO

from . import distributed
from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, QwenGPTQError
from .options import QuantizeOptions, Setting, settings

log = logging.getLogger("qwen_gptq")

EXIT_CODES = """exit codes:
  0  success
  1  a verification check failed, or quantization failed at run time
  2  bad input: a flag, the calibration file, the model or the output path
  130  interrupted (Ctrl-C); no output was written (quantize resumes from its finished layers)
"""

QUANTIZE_EXAMPLE = """example:
  qwen-gptq quantize --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
      --data_path calib.json --out_path Qwen2.5-7B-Instruct-GPTQ-Int4 \\
      --bits 4 --group-size 128 --max_len 8192
  qwen-gptq verify Qwen2.5-7B-Instruct-GPTQ-Int4
  # better quality in the same format, about twice the time (docs/benchmarks.md):
  qwen-gptq quantize ... --gptaq --act-group-aware --clip-weight loss

calibration data (--data_path): a JSON list (or JSON Lines) of
  {"id": "...", "conversations": [{"from": "user", "value": "..."},
                                  {"from": "assistant", "value": "..."}]}
  {"messages": [{"role": "user", "content": "..."}, ...]}   or   {"text": "..."}

"""

VERIFY_EXAMPLE = "example:\n  qwen-gptq verify OUT --original MODEL --eval-text eval.txt\n\n"
BENCH_EXAMPLE = ("examples:\n  qwen-gptq bench OUT --original MODEL --plot table.png   # on a GPU: memory and speed\n"
                 "  qwen-gptq bench OUT --json                              # on a CPU: weights memory only\n\n")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _spellings(flag: str) -> list[str]:
    """--group-size and --group_size (the given spelling first)."""
    body = flag[2:]
    return list(dict.fromkeys([flag, "--" + body.replace("_", "-"), "--" + body.replace("-", "_")]))


def _add(p: argparse.ArgumentParser, s: Setting) -> None:
    f = s.flag
    if f.positional:
        p.add_argument(s.name, help=f.help)
        return
    names = _spellings(f.primary or "--" + s.name.replace("_", "-"))
    if s.type is bool:
        p.add_argument(*names, dest=s.name, action="store_true", default=s.default, help=f.help)
        if f.negative:
            p.add_argument(*_spellings(f.negative), dest=s.name, action="store_false", help=argparse.SUPPRESS)
        return
    kw = {"choices": list(f.choices)} if f.choices else {}
    p.add_argument(*names, dest=s.name, type=s.type, default=None if s.required else s.default, required=s.required,
                   metavar=f.metavar, help=f.help, **kw)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")


def build_parser() -> argparse.ArgumentParser:
    from .verify import VerifyOptions

    parser = argparse.ArgumentParser(
        prog="qwen-gptq",
        description="Quantize Qwen checkpoints with GPTQ (AutoGPTQ v1 format) and verify the result.",
        epilog=QUANTIZE_EXAMPLE + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,verify,bench,models}")

    q = sub.add_parser(
        "quantize", help="quantize a Qwen checkpoint", epilog=QUANTIZE_EXAMPLE + EXIT_CODES, formatter_class=_Formatter,
        description="Quantize a Qwen checkpoint layer by layer with GPTQ and write an AutoGPTQ-format directory.",
    )
    for s in settings(QuantizeOptions):
        _add(q, s)
    _common(q)

    v = sub.add_parser(
        "verify", help="check a quantized checkpoint", formatter_class=_Formatter, epilog=VERIFY_EXAMPLE + EXIT_CODES,
        description="Check a quantized directory: structure, loading and generation, closeness to the original.",
    )
    for s in settings(VerifyOptions):
        _add(v, s)
    _common(v)

    b = sub.add_parser(
        "bench", help="memory and speed of a quantized model (and the original)", formatter_class=_Formatter,
        epilog=BENCH_EXAMPLE + EXIT_CODES,
        description="Qwen's GPTQ table for the checkpoints at hand: weights and peak GPU memory, prefill and "
                    "decode tokens/s at batch 1 and a larger batch, the quantized model through transformers + "
                    "GPTQModel's kernels, the original in bfloat16.",
    )
    from .bench import BenchOptions

    for s in settings(BenchOptions):
        _add(b, s)
    _common(b)

    m = sub.add_parser("models", help="list the supported model families", formatter_class=_Formatter)
    m.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _values(args: argparse.Namespace, options: type) -> dict:
    return {s.name: getattr(args, s.name) for s in settings(options)}


# --------------------------------------------------------------------------- commands


def cmd_quantize(args: argparse.Namespace, out: TextIO) -> int:
    from .quantize import run

    result = run(QuantizeOptions.build(**_values(args, QuantizeOptions), progress=not args.quiet))
    if "out_path" not in result:  # a process other than the first of several: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(result), file=out)
        return 0
    s = result["settings"]
    print(f"wrote {result['out_path']}", file=out)
    print(f"  model     {result['model']} ({result['family']})", file=out)
    print(f"  settings  {s['bits']}-bit, group {s['group_size']}, {'sym' if s['sym'] else 'asym'}, "
          f"desc_act {s['desc_act']}, damp {s['damp_percent']}", file=out)
    print(f"  data      {result['samples']} samples, {result['tokens']} tokens", file=out)
    for layer in result["layers"]:
        print(f"  layer {layer['layer']:3d}  mean loss {layer['mean_loss']:.5g}", file=out)
    print(f"  time      {result['wall_seconds']:.1f} s on {result['device']}", file=out)
    return 0


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    from .verify import MAX_PROBLEMS_SHOWN, VerifyOptions, verify

    report = verify(VerifyOptions(**_values(args, VerifyOptions)))
    if args.json:
        print(json.dumps(report, ensure_ascii=False), file=out)
    else:
        print(f"verify {report['path']}", file=out)
        for c in report["checks"]:
            print(f"  {c['status'].upper():4s}  {c['name']:12s} {c['message']}", file=out)
            for p in c["problems"][MAX_PROBLEMS_SHOWN:]:
                print(f"        {p}", file=out)
        print("OK" if report["ok"] else "FAILED", file=out)
    return 0 if report["ok"] else EXIT_FAILED


def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    from .bench import BenchOptions, bench

    report = bench(BenchOptions(**_values(args, BenchOptions)))
    if args.json:
        print(json.dumps(report), file=out)
        return 0
    s = report["settings"]
    print(f"bench on {report['device']} (prompt {s['prompt_len']}, {s['new_tokens']} new tokens, median of "
          f"{s['runs']})", file=out)
    batches = [str(b) for b in s["batch_sizes"]]
    head = f"  {'precision':9s} {'weights GB':>10s}"
    for b in batches:
        head += f" {'peak GB b' + b:>11s} {'prefill t/s b' + b:>15s} {'decode t/s b' + b:>14s}"
    print(head + "  kernel", file=out)
    for r in report["models"]:
        line = f"  {r['precision']:9s} {r['weights_gb']:10.2f}"
        for b in batches:
            x = r.get("batches", {}).get(b)
            line += (f" {x['peak_gb']:11.2f} {x['prefill_tokens_per_s']:15.0f} {x['decode_tokens_per_s']:14.1f}" if x
                     else f" {'-':>11s} {'-':>15s} {'-':>14s}")
        print(f"{line}  {r['kernel']}", file=out)
    if "note" in report:
        print(f"  ({report['note']})", file=out)
    if "plot" in report:
        print(f"  plot: {report['plot']}", file=out)
    return 0


def cmd_models(args: argparse.Namespace, out: TextIO) -> int:
    from .families import FAMILIES

    if args.json:
        print(json.dumps([{"family": f.name, "model_types": list(f.model_types), "description": f.description,
                           "remote_code": f.remote_code} for f in FAMILIES]), file=out)
    else:
        for f in FAMILIES:
            print(f"{f.name:10s} model_type {', '.join(f.model_types):10s} {f.description}", file=out)
    return 0


COMMANDS = MappingProxyType({"quantize": cmd_quantize, "verify": cmd_verify, "bench": cmd_bench, "models": cmd_models})


# --------------------------------------------------------------------------- main


def _setup_logging(args: argparse.Namespace) -> None:
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    if int(os.environ.get("RANK", "0")) > 0:  # one of several processes (torchrun): rank 0 logs
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("qwen-gptq: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    # transformers is chatty about things our users cannot act on.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@contextlib.contextmanager
def _results_stdout() -> Iterator[TextIO]:
    """Keep stdout for our results alone.

    Libraries we load (GPTQModel prints banners, kernel choices and warnings) may
    write to stdout, even straight to file descriptor 1. While a command runs,
    descriptor 1 and sys.stdout point at stderr; results go to the stream yielded
    here, the real stdout.
    """
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced (pytest capsys, embedding)
        real = sys.stdout
        sys.stdout = sys.stderr  # Python-level prints of libraries still stay off our results
        try:
            yield real
        finally:
            sys.stdout = real
        return
    saved = os.dup(fd)
    out = os.fdopen(saved, "w", encoding="utf-8", closefd=False)
    real = sys.stdout
    os.dup2(2, fd)
    sys.stdout = sys.stderr
    try:
        yield out
    finally:
        out.flush()
        sys.stderr.flush()
        os.dup2(saved, fd)
        os.close(saved)
        sys.stdout = real


def _without_gpus(argv: list[str]) -> list[str]:
    """The command line minus --gpus N (each process started is one of the N)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--gpus",):
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    from .runtime import host_memory_returned_on_free

    host_memory_returned_on_free()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    _setup_logging(args)
    return distributed.exit_code(_run_command(args, argv))


def _run_command(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Run the command; its exit code, with errors reported."""
    try:
        if args.command == "quantize" and args.gpus and args.gpus != "1" and not distributed.launched():
            QuantizeOptions.build(**_values(args, QuantizeOptions)).validate()
            return distributed.launch(args.gpus, _without_gpus(argv if argv is not None else sys.argv[1:]))
        with _results_stdout() as out:
            return COMMANDS[args.command](args, out)
    except QwenGPTQError as e:
        log.error("error: %s", e)
        return e.exit_code
    except ImportError as e:  # e.g. a remote-code model needing a package that is not installed
        log.error("error: a package is missing: %s", e)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted; no output was written%s", " (the finished layers are kept: the same command "
                  "continues from them, --no-resume starts over)" if args.command == "quantize" else "")
        return EXIT_INTERRUPTED
    except MemoryError:
        log.error("error: out of memory; use --device cuda, fewer --num-samples or a smaller --max_len")
        return EXIT_FAILED
    except Exception as e:
        if distributed.peer_lost(e):
            log.error("error: process %s lost contact with another process, which failed or was stopped (its own "
                      "message says why); this one stops too", os.environ.get("RANK", "?"))
            return EXIT_FAILED
        if type(e).__name__ == "OutOfMemoryError":
            log.error("error: the GPU ran out of memory (%s); try fewer --num-samples, a smaller --max_len "
                      "or --batch-size 1", str(e).splitlines()[0])
            return EXIT_FAILED
        log.error("internal error: %s: %s", type(e).__name__, e)
        if getattr(args, "verbose", False):
            log.exception("traceback:")
        else:
            log.error("rerun with --verbose for the traceback, and please report it")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
