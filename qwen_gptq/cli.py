"""Command line: `qwen-gptq quantize | verify | models`.

Results go to stdout (one JSON object with --json), progress and logs to stderr.
Exit codes: 0 ok, 1 a check or the run failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys

from .errors import EXIT_BAD_INPUT, EXIT_FAILED, QwenGPTQError

log = logging.getLogger("qwen_gptq")

EXIT_CODES = """exit codes:
  0  success
  1  a verification check failed, or quantization failed at run time
  2  bad input: a flag, the calibration file, the model or the output path
"""

QUANTIZE_EXAMPLE = """example:
  qwen-gptq quantize --model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
      --data_path calib.json --out_path Qwen2.5-7B-Instruct-GPTQ-Int4 \\
      --bits 4 --group-size 128 --max_len 8192
  qwen-gptq verify Qwen2.5-7B-Instruct-GPTQ-Int4

calibration data (--data_path): a JSON list (or JSON Lines) of
  {"id": "...", "conversations": [{"from": "user", "value": "..."},
                                  {"from": "assistant", "value": "..."}]}
  {"messages": [{"role": "user", "content": "..."}, ...]}   or   {"text": "..."}

"""


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _flag(p, *names, **kw):
    """Add a flag under every dash/underscore spelling of its names."""
    spellings = []
    for n in names:
        for s in (n, n.replace("_", "-"), "--" + n[2:].replace("-", "_")):
            if s not in spellings:
                spellings.append(s)
    return p.add_argument(*spellings, **kw)


def _bool_pair(p, name, default, help):
    dest = name.replace("-", "_")
    _flag(p, f"--{name}", dest=dest, action="store_true", default=default, help=help)
    _flag(p, f"--no-{name}", dest=dest, action="store_false", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-gptq",
        description="Quantize Qwen checkpoints with GPTQ (AutoGPTQ v1 format) and verify the result.",
        epilog=QUANTIZE_EXAMPLE + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,verify,models}")

    q = sub.add_parser(
        "quantize", help="quantize a Qwen checkpoint", epilog=QUANTIZE_EXAMPLE + EXIT_CODES, formatter_class=_Formatter,
        description="Quantize a Qwen checkpoint layer by layer with GPTQ and write an AutoGPTQ-format directory.",
    )
    _flag(q, "--model_name_or_path", required=True, metavar="MODEL", help="model directory (or hub id)")
    _flag(q, "--data_path", required=True, metavar="FILE", help="calibration data (JSON list or JSON Lines)")
    _flag(q, "--out_path", required=True, metavar="DIR", help="output directory")
    _flag(q, "--bits", type=int, default=4, choices=[2, 3, 4, 8], help="bits per weight")
    _flag(q, "--group_size", type=int, default=128, metavar="N", help="columns per quantization group; -1 per channel")
    _flag(q, "--max_len", type=int, default=8192, metavar="N", help="truncate each sample to N tokens")
    _flag(q, "--num_samples", type=int, default=None, metavar="N", help="use the first N samples (default: all)")
    _flag(q, "--damp_percent", type=float, default=0.01, metavar="F", help="Hessian dampening, fraction of mean diag")
    _bool_pair(q, "desc-act", False, "quantize columns in order of decreasing activation (--no-desc-act: off)")
    _flag(q, "--sym", dest="sym", action="store_true", default=True, help="symmetric quantization (default)")
    _flag(q, "--asym", dest="sym", action="store_false", help="asymmetric quantization (zero point per group)")
    _bool_pair(q, "true-sequential", True, "quantize q/k/v, o, gate/up, down one after another (--no-true-sequential: off)")
    _flag(q, "--static_groups", action="store_true", default=False, help="fix group parameters before the solve")
    _bool_pair(q, "mse", True, "per group, search a clipping range minimising the quantization error "
               "(--no-mse: plain min-max scales)")
    _flag(q, "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    _flag(q, "--batch_size", type=int, default=1, metavar="N", help="calibration samples per forward pass")
    _flag(q, "--seed", type=int, default=None, metavar="S", help="shuffle the samples with this seed before --num-samples")
    _flag(q, "--trust_remote_code", action="store_true", help="allow the model's own code to run (Qwen1)")
    _flag(q, "--overwrite", action="store_true", help="replace a non-empty --out_path")
    _flag(q, "--max_shard_size", default="5GB", metavar="SIZE", help="split weights into shards of at most SIZE")
    _flag(q, "--dtype", default="float16", choices=["float16", "bfloat16"], help="dtype of unquantized tensors")
    _flag(q, "--reference_config", default=None, metavar="FILE", help="config.json of an official quantized model")
    _flag(q, "--json", action="store_true", help="print one JSON object on stdout")
    _common(q)

    from .verify import add_arguments as add_verify

    v = sub.add_parser(
        "verify", help="check a quantized checkpoint", formatter_class=_Formatter,
        description="Check a quantized directory: structure, loading and generation, closeness to the original.",
        epilog="example:\n  qwen-gptq verify OUT --original MODEL --eval-text eval.txt\n\n" + EXIT_CODES,
    )
    add_verify(v, _flag)
    _common(v)

    m = sub.add_parser("models", help="list the supported model families", formatter_class=_Formatter)
    _flag(m, "--json", action="store_true", help="print JSON")
    return parser


def _common(p):
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")


def _setup_logging(args):
    level = logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING if getattr(args, "quiet", False) else logging.INFO
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


def cmd_quantize(args, out) -> int:
    from .quantize import QuantizeOptions, run

    opts = QuantizeOptions(
        model_name_or_path=args.model_name_or_path, data_path=args.data_path, out_path=args.out_path,
        bits=args.bits, group_size=args.group_size, max_len=args.max_len, num_samples=args.num_samples,
        damp_percent=args.damp_percent, desc_act=args.desc_act, sym=args.sym, true_sequential=args.true_sequential,
        static_groups=args.static_groups, mse=args.mse, device=args.device, batch_size=args.batch_size,
        seed=args.seed, trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, dtype=args.dtype, reference_config=args.reference_config,
        progress=not args.quiet,
    )
    result = run(opts)
    if args.json:
        print(json.dumps(result), file=out)
    else:
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


def cmd_models(args, out) -> int:
    from .families import FAMILIES

    if args.json:
        print(json.dumps([{"family": f.name, "model_types": list(f.model_types), "description": f.description,
                           "remote_code": f.remote_code} for f in FAMILIES]), file=out)
    else:
        for f in FAMILIES:
            print(f"{f.name:10s} model_type {', '.join(f.model_types):10s} {f.description}", file=out)
    return 0


@contextlib.contextmanager
def _results_stdout():
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


def main(argv=None) -> int:
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
    try:
        with _results_stdout() as out:
            if args.command == "quantize":
                return cmd_quantize(args, out)
            if args.command == "verify":
                from .verify import cmd_verify

                return cmd_verify(args, out)
            return cmd_models(args, out)
    except QwenGPTQError as e:
        log.error("error: %s", e)
        return e.exit_code
    except ImportError as e:  # e.g. a remote-code model needing a package that is not installed
        log.error("error: a package is missing: %s", e)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        log.error("interrupted; nothing was written")
        return 130
    except MemoryError:
        log.error("error: out of memory; use --device cuda, fewer --num-samples or a smaller --max_len")
        return EXIT_FAILED
    except Exception as e:
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
