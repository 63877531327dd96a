"""The `idefics2` command: generate, chat, serve, info, finetune (from `idefics2.finetune`).

Thin: each subcommand parses flags, calls library code and prints. Without `--model` it uses the
small Idefics2 shipped inside the package, so it works offline on a fresh machine. User mistakes
(missing files, unreadable images, bad flags or values) end with one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

SHIPPED_MODEL = "shapes-vqa"
EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 3  # a failure that is not a mistake in the input (a bug: please report it)


class UserError(Exception):
    """A mistake in what the user gave: reported as one line, exit code 1."""


DEFAULT_MAX_NEW_TOKENS = 512  # when neither --max-new-tokens nor the checkpoint sets it


def shipped_model_path() -> Path:
    return Path(str(resources.files("idefics2") / "assets" / SHIPPED_MODEL))


def load(model: str | None, dtype: str, device: str, adapter: str | None = None,
         download: bool = False, quantization: str | None = None, group_size: int = 128) -> tuple[Any, Any]:
    """(model, processor) from a Hub-layout folder or repo id; the shipped model by default. A LoRA
    `adapter` folder (ours or PEFT's) is folded into the weights, so generation costs what it did;
    with `quantization` too, the merged weights are quantized after the merge."""
    from idefics2.checkpoint import resolve_device
    from idefics2.files import resolve_folder
    from idefics2.modeling import Idefics2ForConditionalGeneration
    from idefics2.processing.processor import Idefics2Processor

    if model is None and not (shipped_model_path() / "config.json").is_file():
        raise UserError(f"the shipped model is missing from {shipped_model_path()}; reinstall idefics2 or pass --model")
    folder = resolve_folder(model or shipped_model_path(), allow_download=download or None)
    lm = Idefics2ForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, device=resolve_device(device), progress=True,
        quantization=quantization if adapter is None else None, group_size=group_size)
    if adapter is not None:
        from idefics2.lora import load_adapter, merge_lora
        from idefics2.model.quant import quantize_linears

        load_adapter(lm, adapter)
        merge_lora(lm)
        if quantization is not None:
            for part in (lm.model.text_model, lm.model.connector):
                quantize_linears(part, quantization, group_size)
    return lm, Idefics2Processor.from_pretrained(folder)


def open_images(paths: Sequence[str]) -> list[Any]:
    from idefics2.processing.image_file import read_image

    images = []
    for path in paths:
        try:
            images.append(read_image(path))
        except FileNotFoundError:
            raise UserError(f"image not found: {path}") from None
        except ValueError as err:
            raise UserError(f"cannot read image {path}: {err}") from None
    return images


def user_turn(text: str, num_images: int) -> dict[str, Any]:
    """A chat message with the images first, then the question (the layout Idefics2 was tuned on)."""
    from idefics2.processing.processor import reserved_token_in

    reserved = reserved_token_in(text)
    if reserved:
        raise UserError(f"the prompt holds {reserved}, which the chat template writes itself; pass images "
                        "with --image")
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}


def answer(model: Any, processor: Any, messages: list[dict[str, Any]], images: list[Any],
           args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    """Run one assistant turn; streams pieces to stdout when `stream`. Returns the answer and timings."""
    from idefics2.serving.turn import AssistantTurn

    start = time.perf_counter()
    options = sampling_options(model, args)
    constraint = constraint_option(args)
    if constraint is not None:
        options.update(constraint=constraint, tokenizer=processor.tokenizer)
    turn = AssistantTurn(model, processor, messages, images, **options)
    for piece in turn:
        if stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    assert turn.result is not None
    return {"answer": turn.result.text, "new_tokens": turn.result.completion_tokens,
            "seconds": round(time.perf_counter() - start, 3)}


def sampling_options(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """`generate` options from the flags; unset ones resolve as in the server (`sampling_defaults`:
    the checkpoint's generation_config.json, else OpenAI's defaults, no top-k unless asked).
    `--do-sample` samples at temperature 1 where the checkpoint would decode greedily."""
    from idefics2.generation.config import GenerationConfig
    from idefics2.serving.protocol import sampling_defaults

    resolved = sampling_defaults(model.generation_config or GenerationConfig())
    temperature = args.temperature if args.temperature is not None else resolved["temperature"]
    if args.do_sample and temperature == 0:
        temperature = 1.0
    return {"max_new_tokens": args.max_new_tokens or resolved["max_tokens"] or DEFAULT_MAX_NEW_TOKENS,
            "do_sample": temperature > 0, "temperature": temperature or 1.0,
            "top_k": args.top_k if args.top_k is not None else resolved["top_k"],
            "top_p": args.top_p if args.top_p is not None else resolved["top_p"], "seed": args.seed}


def constraint_option(args: argparse.Namespace) -> Any:
    """The `Constraint` of --json-schema FILE, --regex or --choice (at most one kind), or None; with
    the chat answer's optional leading space (the template leaves it to the model)."""
    from idefics2.generation.constraints import Constraint

    given = [name for name, value in (("--json-schema", args.json_schema), ("--regex", args.regex),
                                      ("--choice", args.choice)) if value]
    if len(given) > 1:
        raise UserError(f"use one of --json-schema, --regex and --choice, not {' and '.join(given)}")
    if args.json_schema:
        path = Path(args.json_schema)
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise UserError(f"cannot read --json-schema {path}: {err.strerror or err}") from None
        except ValueError as err:
            raise UserError(f"--json-schema {path} is not JSON: {err}") from None
        return Constraint("json_schema", schema, strict=not args.lenient_schema, leading_space=True)
    if args.regex:
        return Constraint("regex", args.regex, leading_space=True)
    if args.choice:
        return Constraint("choices", tuple(args.choice), leading_space=True)
    if args.lenient_schema:
        raise UserError("--lenient-schema needs --json-schema")
    return None


def cmd_generate(args: argparse.Namespace) -> None:
    images = open_images(args.image)
    model, processor = load(args.model, args.dtype, args.device, args.adapter, args.download, args.quantization,
                            args.group_size)
    messages = ([{"role": "system", "content": [{"type": "text", "text": args.system}]}] if args.system else [])
    messages.append(user_turn(args.prompt, len(images)))
    out = answer(model, processor, messages, images, args, stream=not args.json)
    if args.json:
        print(json.dumps({"model": str(args.model or SHIPPED_MODEL), "prompt": args.prompt, **out}))
    else:
        print()


def cmd_chat(args: argparse.Namespace) -> None:
    """Multi-turn chat on stdin: `/image PATH` attaches an image to the next question, `/reset`, `/quit`."""
    model, processor = load(args.model, args.dtype, args.device, args.adapter, args.download, args.quantization,
                            args.group_size)
    messages: list[dict[str, Any]] = []
    all_images: list[Any] = []
    pending = open_images(args.image)
    interactive = sys.stdin.isatty()
    if interactive:
        print("idefics2 chat: /image PATH attaches an image, /reset starts over, /quit ends.", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/image "):
            try:
                pending += open_images([line[len("/image "):].strip()])
            except UserError as err:
                print(f"idefics2: error: {err}", file=sys.stderr)
            continue
        if line == "/reset":
            messages, all_images, pending = [], [], []
            continue
        try:
            messages.append(user_turn(line, len(pending)))
        except UserError as err:  # the conversation so far is kept
            print(f"idefics2: error: {err}", file=sys.stderr)
            continue
        all_images += pending
        pending = []
        out = answer(model, processor, messages, all_images, args, stream=True)
        print()
        messages.append({"role": "assistant", "content": [{"type": "text", "text": out["answer"]}]})


def cmd_info(args: argparse.Namespace) -> None:
    """Config summary, parameter counts per part and file sizes, without reading the weights."""
    import torch

    from idefics2.checkpoint import skip_init, weight_files
    from idefics2.config import Idefics2Config
    from idefics2.files import resolve_folder
    from idefics2.modeling import Idefics2ForConditionalGeneration

    folder = resolve_folder(args.model or shipped_model_path(), allow_download=args.download or None)
    config = Idefics2Config.from_pretrained(folder)
    with skip_init(), torch.device("meta"):
        model = Idefics2ForConditionalGeneration(config)
    parts = {"vision tower": model.model.vision_model, "connector": model.model.connector,
             "text decoder": model.model.text_model, "lm_head": model.lm_head}
    v, p, t = config.vision_config, config.perceiver_config, config.text_config
    print(f"model: {folder}")
    print(f"vision: {v.hidden_size} wide x {v.num_hidden_layers} layers, patch {v.patch_size}, image_size {v.image_size}")
    print(f"perceiver: {p.resampler_n_latents} latents x {p.resampler_depth} layers, {p.resampler_n_heads} heads "
          f"({p.num_key_value_heads} kv)")
    print(f"text: {t.hidden_size} wide x {t.num_hidden_layers} layers, {t.num_attention_heads} heads "
          f"({t.num_key_value_heads} kv), vocab {t.vocab_size}, window {t.sliding_window}")
    for name, module in parts.items():
        print(f"  {name:<13}{sum(q.numel() for q in module.parameters()):>15,} parameters")
    print(f"  {'total':<13}{model.num_parameters():>15,} parameters (tied head counted once)")
    for file in [folder / "config.json", *weight_files(folder)]:
        print(f"  {file.name:<40}{file.stat().st_size / 1e6:>10.2f} MB")


def cmd_serve(args: argparse.Namespace) -> None:
    """An OpenAI-compatible HTTP server (`idefics2.serving.server`) until Ctrl-C."""
    try:
        from idefics2.serving.server import serve
    except ImportError as err:
        raise UserError(f"the server needs fastapi and uvicorn ({err}): pip install 'idefics2[server]'") from None
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {args.port}")
    model, processor = load(args.model, args.dtype, args.device, args.adapter, args.download, args.quantization,
                            args.group_size)
    name = args.served_model_name or (Path(args.model).name if args.model else SHIPPED_MODEL)
    for flag in ("max_batch_size", "max_queue", "max_body_mb"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError(f"--max-model-len must be at least 2, got {args.max_model_len}")
    serve(model, processor, name, host=args.host, port=args.port, allow_remote_images=args.allow_remote_images,
          compile=args.compile, max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
          max_queue=args.max_queue, max_body_bytes=args.max_body_mb * 2**20, api_key=args.api_key,
          cors_origins=args.cors_origin or None)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hub-layout checkpoint folder or repo id (default: the shipped model)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--adapter", help="a LoRA adapter folder (from `idefics2 finetune` or PEFT) to apply")
    add_download_flag(parser)
    parser.add_argument("--quantization", choices=["int8", "int4"],
                        help="store the decoder's and connector's weights in int8 or int4 (quantized while loading)")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                        help="inputs per int4 scale (default 128)")


def add_download_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--download", action="store_true",
                        help="download --model from the Hugging Face Hub when it is a repo id not yet in the cache")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default: generation_config.json's max_new_tokens, else {DEFAULT_MAX_NEW_TOKENS}")
    parser.add_argument("--do-sample", action="store_true",
                        help="sample even where the checkpoint decodes greedily (do_sample: false)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy; default: generation_config.json's, else 1 (sampling), as the server")
    parser.add_argument("--top-k", type=int, default=None, help="default: generation_config.json's, else off")
    parser.add_argument("--top-p", type=float, default=None, help="default: generation_config.json's, else 1")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json-schema", metavar="FILE",
                        help="answer with JSON that follows the schema in FILE")
    parser.add_argument("--lenient-schema", action="store_true",
                        help="with --json-schema: ignore keywords that cannot be enforced (default: refuse)")
    parser.add_argument("--regex", help="answer with text matching this regular expression")
    parser.add_argument("--choice", action="append", metavar="TEXT",
                        help="answer with exactly one of the choices (repeat: --choice A --choice B)")


# Commands whose flags come from their module: name -> (one-line help, "module:function adding its parser").
TRAINING_COMMANDS = {
    "finetune": ("fine-tune a checkpoint on your conversations (LoRA)",
                 "idefics2.finetune.command:register_finetune_command"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; of the `TRAINING_COMMANDS`, only `command` gets its flags (and its import)."""
    parser = argparse.ArgumentParser(prog="idefics2", description="Ask Idefics2 about images.")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer one prompt about images")
    generate.add_argument("prompt")
    add_generation_flags(generate)
    add_model_flags(generate)
    generate.add_argument("--system", help="a system message before the question")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    generate.set_defaults(func=cmd_generate)

    chat = commands.add_parser("chat", help="a multi-turn conversation on stdin")
    add_generation_flags(chat)
    add_model_flags(chat)
    chat.set_defaults(func=cmd_chat)

    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/chat/completions)")
    add_model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model id clients send (default: the folder name)")
    serve.add_argument("--allow-remote-images", action="store_true",
                       help="fetch http(s) image URLs (off: only inline data: URIs)")
    serve.add_argument("--compile", action="store_true",
                       help="torch.compile the decode step: a slow first request, faster decoding after")
    serve.add_argument("--max-batch-size", type=int, default=16, help="sequences decoding together (default 16)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="positions per sequence, prompt included (default: the model's)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get 429")
    serve.add_argument("--max-body-mb", type=int, default=20, help="request body limit in MiB; more get 413")
    serve.add_argument("--api-key", default=os.environ.get("IDEFICS2_API_KEY"),
                       help="require Authorization: Bearer KEY on /v1 (default: $IDEFICS2_API_KEY, else none)")
    serve.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                       help="allow browser requests from ORIGIN (repeatable; off by default)")
    serve.set_defaults(func=cmd_serve)

    info = commands.add_parser("info", help="config summary, parameter count, file sizes")
    info.add_argument("--model", help="checkpoint folder or repo id (default: the shipped model)")
    add_download_flag(info)
    info.set_defaults(func=cmd_info)

    for name, (text, target) in TRAINING_COMMANDS.items():
        if name == command:  # import the module (torch training code, its flags) only for its command
            module, _, register = target.partition(":")
            getattr(importlib.import_module(module), register)(commands, help=text)
        else:
            commands.add_parser(name, help=text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        message = " ".join(str(err).split())
        print(f"idefics2: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # anything else is still one line, not a traceback (IDEFICS2_DEBUG=1 shows it)
        if os.environ.get("IDEFICS2_DEBUG"):
            raise
        message = " ".join(str(err).split())[:500]
        print(f"idefics2: error: {type(err).__name__}: {message} (set IDEFICS2_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
