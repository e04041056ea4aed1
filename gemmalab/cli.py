"""`gemmalab` command line: a thin front over the library.

gemmalab generate "prompt"      stream a continuation to stdout (--image PATH: multimodal models)
gemmalab chat                   interactive multi-turn chat (/reset clears, /image PATH, Ctrl-D exits)
gemmalab serve [--port 8000]    OpenAI-compatible server (chat/completions, streaming, batching)
gemmalab info [--model PATH]    config, parameter counts, tensor types, KV-cache bytes
gemmalab export SRC --to {hf,gguf} OUT [--dtype D] [--overwrite]
                                write a model (or a QAT run) as a Hugging Face directory or a GGUF
                                file; --dtype q4_0 / q4_0_channel (GGUF), sfp8 (HF directory)
gemmalab train sft CONFIG       fine-tune (TOML/YAML config, section.key=value overrides, --resume)
gemmalab train distill CONFIG   distil a student from a teacher-logit store or an online teacher
gemmalab train qat CONFIG       quantization-aware training (Q4_0, int4 per channel, SFP8)
gemmalab distill cache --data DATA --out DIR [--teacher MODEL] [--k 256] [--temperature T] ...
                                run the teacher once and store K sampled ids + probabilities per token
gemmalab distill inspect DIR    describe a teacher-logit store and verify its shards
gemmalab plot RUN_DIR           PNG curves of a training run
gemmalab eval perplexity FILE   llama-perplexity's protocol (--ctx, --chunks, --kl-reference MODEL)
gemmalab eval long-context      NLL by position + window baseline, passkey, RULER-offline, RoPE sweep
gemmalab eval humaneval         HumanEval pass@k, every program in the sandbox
gemmalab eval harness --tasks T lm-evaluation-harness with gemmalab as the model
gemmalab sandbox doctor|run F   what the code sandbox can do here; run one untrusted program
gemmalab merge average RUN... -o OUT   WARM: weight-average reward models (LoRA on its updates) or runs
gemmalab reward score RM FILE   a reward model's accuracy on pairs, or scores of completions

Errors a user can cause (wrong path, corrupt file, prompt too long, bad flag values) print one line
`gemmalab: error: ...` and exit with status 2 (usage) or 1 (everything else), never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _port(text: str) -> int:
    value = _int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text}")
    return value


def _lookup(text: str) -> int:
    from .model.cache import RING_HEADROOM
    value = _nonneg_int(text)
    if value > RING_HEADROOM:
        raise argparse.ArgumentTypeError(f"lookup must be in [1, {RING_HEADROOM}] draft tokens "
                                         f"(0 = off), got {text}")
    return value


def _float_in(lo: float, hi: float, lo_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not ((lo < value if lo_open else lo <= value) and value <= hi):
            raise argparse.ArgumentTypeError(
                f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {text}")
        return value
    return parse


def _add_model(p: argparse.ArgumentParser, mode: bool = False) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file or Hugging Face directory (default: the embedded Gemma 3 270M)")
    if mode:
        p.add_argument("--mode", default="auto", choices=["auto", "fp32", "native", "q8"],
                       help="auto (default): the fastest mode that keeps fp32 quality (native on "
                            "AVX2 CPUs); fp32: exact reference; native: the file's quantized "
                            "blocks; q8: every matrix in Q8_0")
        p.add_argument("--threads", type=_positive_int, default=None,
                       help="CPU threads (default: the cores this process may use)")


def _add_sampling(p: argparse.ArgumentParser, max_new: int) -> None:
    p.add_argument("--max-new-tokens", "-n", type=_nonneg_int, default=max_new)
    p.add_argument("--temperature", "-t", type=_float_in(0.0, 100.0), default=1.0,
                   help="0 = greedy (default 1.0, Gemma's recommended setting)")
    p.add_argument("--top-k", type=_nonneg_int, default=64, help="0 disables (default 64)")
    p.add_argument("--top-p", type=_float_in(0.0, 1.0, lo_open=True), default=0.95)
    p.add_argument("--seed", type=_int, default=None, help="make sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", "-i", dest="images", action="append", default=[], metavar="PATH",
                   help="image file for a multimodal model (repeatable); it goes where the prompt "
                        "says <start_of_image>, else before the text")
    p.add_argument("--pan-and-scan", action="store_true",
                   help="also show the model crops of wide or tall images (Gemma 3 Pan & Scan)")


def _check_images(paths: list[str], model: str | None) -> None:
    """Fail on a bad image file, or a model without a vision encoder, before loading the model."""
    from ._paths import default_model_path
    from .checkpoints import checkpoint_kind
    from .checkpoints.hf import has_vision
    from .images import load_image

    if not paths:
        return
    for path in paths:
        load_image(path)
    p = Path(model).expanduser() if model else default_model_path()
    kind = checkpoint_kind(p)
    if kind == "hf" and not (p / "config.json").is_file():
        return  # load() says what is wrong with the directory
    if kind != "hf" or not has_vision(p):
        raise ValueError(f"{p.name} is a text-only model and cannot take images; use a multimodal "
                         "Gemma 3 checkpoint (Gemma3ForConditionalGeneration: 4B, 12B or 27B)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemmalab", description="Run Gemma 3 models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt, streaming to stdout")
    g.add_argument("prompt", help="prompt text ('-' reads stdin)")
    _add_model(g, mode=True)
    _add_sampling(g, 128)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--lookup", type=_lookup, default=0, metavar="K",
                   help="prompt-lookup speculative decoding with up to K draft tokens per step "
                        "(same output; faster when the answer repeats the prompt); 0 = off")
    g.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    _add_images(g)

    c = sub.add_parser("chat", help="interactive multi-turn chat")
    _add_model(c, mode=True)
    _add_sampling(c, 512)
    c.add_argument("--system", default=None, help="system prompt (folded into the first turn)")
    _add_images(c)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _add_model(sv, mode=True)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=_port, default=8000)
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on /v1/* (or set GEMMALAB_API_KEY)")
    sv.add_argument("--max-batch", type=_positive_int, default=16,
                    help="sequences decoded together (more wait in a queue)")
    sv.add_argument("--max-queue", type=_positive_int, default=256, help="waiting requests before 503")
    sv.add_argument("--max-context", type=_positive_int, default=None,
                    help="tokens per sequence, prompt included (default: the model's; the KV cache "
                         "holds max-batch x max-context tokens)")
    sv.add_argument("--max-body", type=_positive_int, default=1 << 20, help="request body limit (bytes)")
    sv.add_argument("--timeout", type=_float_in(0.0, 86400.0, lo_open=True), default=600.0,
                    help="seconds a request may take")
    sv.add_argument("--model-name", default=None, help="the model id clients send (default: file name)")

    i = sub.add_parser("info", help="config, parameter counts, tensor types, KV-cache bytes")
    _add_model(i)
    i.add_argument("--json", action="store_true", help="print JSON")

    e = sub.add_parser("export", help="write a model as a Hugging Face directory or a GGUF file")
    e.add_argument("src", metavar="SRC", help="GGUF file, Hugging Face directory, or a `train qat` run")
    e.add_argument("--to", required=True, choices=["hf", "gguf"], help="output format")
    e.add_argument("out", metavar="OUT", help="output directory (hf) or .gguf file (gguf)")
    e.add_argument("--dtype", default=None,
                   help="hf: fp32, bf16 or sfp8 (default fp32); gguf: f32, f16, q8_0, q4_0 or "
                        "q4_0_channel (int4 per row as Q4_0 blocks; default f16; a QAT run: the format "
                        "it trained on)")
    e.add_argument("--embedding", choices=["q8_0", "f16", "f32"], default=None,
                   help="q4_0 / q4_0_channel: the embedding's type (default q8_0; a QAT run: its own)")
    e.add_argument("--rounding", choices=["ref", "rne"], default="ref",
                   help="q4_0 / q4_0_channel ties: ref (ggml's, default) or rne (to even)")
    e.add_argument("--sfp8-encoder", choices=["production", "exact_rne"], default=None,
                   help="sfp8: gemma.cpp's production encoder (default) or exact round-to-nearest-even")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    from .train.recipes import RECIPES
    t = sub.add_parser("train", help=f"train a model (recipes: {', '.join(RECIPES)})",
                       description="Each recipe reads a TOML / YAML / JSON config; "
                                   "`gemmalab train RECIPE --help` describes one.")
    recipes = t.add_subparsers(dest="recipe", required=True, metavar="RECIPE")
    for recipe in RECIPES.values():
        r = recipes.add_parser(recipe.name, help=recipe.help, description=recipe.description)
        r.add_argument("config", help="TOML, YAML or JSON config file")
        r.add_argument("overrides", nargs="*", help="section.key=value")
        r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
        r.add_argument("--no-progress", action="store_true", help="no progress bar")

    dc = sub.add_parser("distill", help="teacher-logit stores for distillation (cache, inspect)")
    tools = dc.add_subparsers(dest="tool", required=True, metavar="TOOL")
    ca = tools.add_parser(
        "cache", help="run the teacher over data and store K sampled ids + probabilities per token",
        description="Runs the teacher over packed rows of DATA and writes, for every target position, "
                    "K token ids sampled from the teacher (Gemma 3: 256, with replacement) with their "
                    "16-bit probabilities, in sharded files. Rerun the same command to resume after an "
                    "interruption or to append after --max-tokens.")
    ca.add_argument("--teacher", default=None,
                    help="GGUF file or Hugging Face directory (default: the embedded Gemma 3 270M)")
    ca.add_argument("--data", required=True, nargs="+", help="JSONL / Parquet files, directories or globs")
    ca.add_argument("--out", required=True, help="store directory (created, or resumed)")
    ca.add_argument("--k", type=_positive_int, default=256, help="ids per position (default 256)")
    ca.add_argument("--temperature", type=_float_in(0.0, 100.0, lo_open=True), default=1.0,
                    help="teacher temperature of the stored distribution (default 1)")
    ca.add_argument("--sampling", choices=["sample", "topk"], default="sample",
                    help="sample from the teacher (default) or keep its top k")
    ca.add_argument("--replacement", action=argparse.BooleanOptionalAction, default=True,
                    help="sample with replacement, storing counts (default), or without")
    ca.add_argument("--seq-len", type=_positive_int, default=1024, help="packed row length (default 1024)")
    ca.add_argument("--train-on", choices=["all", "model"], default="all",
                    help="targets: every token (pre-training text, default) or model turns only")
    ca.add_argument("--seed", type=_int, default=0, help="data shuffling and sampling seed")
    ca.add_argument("--max-tokens", type=_positive_int, default=None,
                    help="stop after this many target tokens (rerun with more to append)")
    ca.add_argument("--rows-per-shard", type=_positive_int, default=None,
                    help="packed rows per shard file (default: 64, fewer with --full-logprobs)")
    ca.add_argument("--full-logprobs", action="store_true",
                    help="also store the full fp16 log-probabilities (V x 2 bytes per token; a reference "
                         "for full-vocabulary KD and KL evaluation)")
    ca.add_argument("--prob-dtype", choices=["float16", "bfloat16"], default="float16")
    ca.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for the teacher")
    ca.add_argument("--no-progress", action="store_true", help="no progress bar")
    ins = tools.add_parser("inspect", help="describe a store and verify every shard's checksum")
    ins.add_argument("store")

    ev = sub.add_parser("eval", help="evaluate a model (perplexity, long context, HumanEval, lm-eval)")
    evals = ev.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    import importlib
    from . import eval as eval_pkg
    for name in eval_pkg.COMMANDS:
        importlib.import_module(f"{eval_pkg.__name__}.{name}").add_cli(evals)

    from . import sandbox
    sandbox.add_cli(sub)
    from .train import merge_cli
    merge_cli.add_cli(sub)

    pl = sub.add_parser("plot", help="write PNG curves of a training run")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
    return parser


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                stop=args.stop)


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    _check_images(args.images, args.model)
    lm = _load(args)
    vision = {}
    if args.images:  # text prompts: the image markers are laid out before tokenizing (lm.py)
        vision = dict(images=args.images, pan_and_scan=args.pan_and_scan)
        content = [{"type": "image"} for _ in args.images] + [{"type": "text", "text": prompt}]
        ids = lm.chat_prompt([{"role": "user", "content": content}]) if args.chat else prompt
    else:
        ids = (lm.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if args.chat
               else lm.tokenizer.encode(prompt))
    stats: dict = {}
    for piece in lm.stream(ids, args.max_new_tokens, stats=stats, lookup=args.lookup, **vision,
                           **_sampling(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats and stats:
        extra = (f", lookup accepted {stats['accepted']}/{stats['drafted']} drafts"
                 if "drafted" in stats else "")
        if lm.mode in ("native", "q8"):
            from .quant import kernels
            ps = kernels.pool_stats()
            extra += (f", {kernels.isa()} kernels, {ps['threads']} threads"
                      + (f" (alone for {ps['solo_jobs']} of {ps['jobs']} steps: cores busy)"
                         if ps["solo_jobs"] else ""))
        print(f"[{lm.mode} mode, {stats['prompt_tokens']} prompt tokens, prefill "
              f"{stats['prefill_s']:.2f}s, {stats['new_tokens']} new tokens at "
              f"{stats['decode_tok_s']:.1f} tok/s{extra}, load {lm.load_seconds:.2f}s]", file=sys.stderr)
    return 0


def _load(args):
    import torch

    from . import load
    if args.threads:
        torch.set_num_threads(args.threads)
    return load(args.model, mode=args.mode)


def cmd_chat(args) -> int:
    _check_images(args.images, args.model)
    lm = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"gemmalab chat with {lm.path.name}. /reset starts over, "
              f"{'/image PATH adds an image, ' if lm.multimodal else ''}Ctrl-D exits.")
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    system = list(messages)
    pending = list(args.images)  # images for the next user message
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            print()
            break
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = list(system)
            print("(conversation cleared)")
            continue
        if line.strip().startswith("/image"):
            path = line.strip()[len("/image"):].strip()
            try:
                if lm.multimodal is None:
                    raise ValueError("this model is text-only and cannot take images")
                _check_images([path], str(lm.path))
            except ValueError as e:
                print(f"gemmalab: error: {e}", file=sys.stderr)
                continue
            pending.append(path)
            print(f"(image {path} goes with your next message)")
            continue
        if pending:
            content = [{"type": "image", "image": p} for p in pending] + [
                {"type": "text", "text": line}]
            messages.append({"role": "user", "content": content})
        else:
            messages.append({"role": "user", "content": line})
        images = [item["image"] for m in messages if isinstance(m["content"], list)
                  for item in m["content"] if item.get("type") == "image"]
        prompt = lm.chat_prompt(messages) if images else lm.tokenizer.encode_chat(messages)
        vision = dict(images=images, pan_and_scan=args.pan_and_scan) if images else {}
        reply = []
        try:
            for piece in lm.stream(prompt, args.max_new_tokens, **vision, **_sampling(args)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C stops this answer, keeps the conversation
            pass
        except ValueError as e:  # e.g. the conversation outgrew the context
            messages.pop()
            print(f"gemmalab: error: {e} (use /reset)", file=sys.stderr)
            continue
        pending = []
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_serve(args) -> int:
    import os

    from .serve import _require_deps, serve
    _require_deps()
    lm = _load(args)
    max_context = args.max_context or min(lm.config.max_position_embeddings, 8192)
    serve(lm, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("GEMMALAB_API_KEY"),
          max_batch=args.max_batch, max_queue=args.max_queue, max_context=max_context,
          max_body_bytes=args.max_body, request_timeout=args.timeout, model_name=args.model_name)
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def model_info(path: str | None) -> dict:
    """What `gemmalab info` shows; reads metadata and headers only, never dequantizes."""
    from ._paths import default_model_path
    from .checkpoints import gguf as gguf_ckpt
    from .checkpoints import hf as hf_ckpt
    from .checkpoints import CheckpointError, checkpoint_kind

    p = Path(path).expanduser() if path else default_model_path()
    if checkpoint_kind(p) == "hf":
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p} has no config.json; a Hugging Face model directory needs one")
        raw = hf_ckpt.read_json(p / "config.json")  # one-line CheckpointError for a bad file
        config = hf_ckpt.config_from_hf(raw, p.name)
        multimodal = hf_ckpt.multimodal_config_from_hf(raw, p.name)
        types = Counter(hf_ckpt.tensor_dtypes(p).values())
    else:
        reader = gguf_ckpt.open_gguf(p)
        config = gguf_ckpt.config_from_gguf(reader, p.stem)
        types = Counter(t.type_name for t in reader.tensors)
        multimodal = None
    kv = {}
    for ctx in (8192, 32768, 131072):
        hybrid, full = config.kv_cache_bytes(ctx, 2), config.kv_cache_bytes(ctx, 2, hybrid=False)
        kv[ctx] = dict(hybrid=hybrid, all_global=full, ratio=hybrid / full,
                       beyond_context=ctx > config.max_position_embeddings)
    from . import cpu
    info = dict(path=str(p), config=config, tensor_types=dict(types), kv_cache_bf16=kv,
                parameters=dict(embedding=config.embedding_parameters,
                                non_embedding=config.non_embedding_parameters),
                machine=cpu.describe())
    if multimodal is not None:
        v = multimodal.vision
        info["vision"] = dict(layers=v.num_hidden_layers, width=v.hidden_size,
                              heads=v.num_attention_heads, image_size=v.image_size,
                              patch_size=v.patch_size,
                              tokens_per_image=multimodal.mm_tokens_per_image,
                              parameters=v.num_parameters,
                              projector_parameters=multimodal.projector_parameters)
    return info


def cmd_info(args) -> int:
    import dataclasses

    info = model_info(args.model)
    c = info["config"]
    if args.json:
        out = dict(info, config=dataclasses.asdict(c))
        print(json.dumps(out, indent=2))
        return 0
    par = info["parameters"]
    print(f"model      {info['path']}")
    print(f"family     {c.family}: {c.num_hidden_layers} layers ({c.num_local_layers} local / "
          f"{c.num_global_layers} global), d_model {c.hidden_size}, ffn {c.intermediate_size}")
    print(f"attention  {c.num_attention_heads} q heads, {c.num_key_value_heads} kv heads, head_dim "
          f"{c.head_dim}, window {c.sliding_window}, query scalar {c.query_pre_attn_scalar}")
    print(f"rope       local theta {c.rope_local_base_freq:g}, global theta {c.rope_theta:g}, "
          f"global linear factor {c.rope_scaling_factor:g}")
    print(f"context    {c.max_position_embeddings} tokens, vocab {c.vocab_size}")
    if c.attn_logit_softcapping or c.final_logit_softcapping:
        print(f"softcap    attention {c.attn_logit_softcapping}, final {c.final_logit_softcapping}")
    print(f"parameters {par['embedding'] + par['non_embedding']:,} ({par['embedding']:,} embedding"
          f" + {par['non_embedding']:,} non-embedding)")
    if "vision" in info:
        v = info["vision"]
        print(f"vision     SigLIP {v['layers']} layers, width {v['width']}, {v['image_size']} px in "
              f"{v['patch_size']} px patches, {v['tokens_per_image']} tokens per image; "
              f"{v['parameters']:,} + projector {v['projector_parameters']:,} parameters")
    print("tensors    " + ", ".join(f"{k} x{v}" for k, v in sorted(info["tensor_types"].items())))
    m = info["machine"]
    print(f"cpu        {m['cpu']} ({m['id']}): {', '.join(m['flags']) or 'no SIMD flags'}")
    print(f"kernels    {m['kernels']} (GEMMALAB_ISA=avx2|avx512|amx overrides); bf16 compute "
          f"{'on' if m['bf16'] else 'off'} (GEMMALAB_CPU_BF16=0|1)")
    print("KV cache (bf16, one sequence):   hybrid     all-global   ratio")
    for ctx, row in info["kv_cache_bf16"].items():
        note = "  (beyond the model context)" if row["beyond_context"] else ""
        print(f"  {ctx // 1024:>4}K tokens            {_human(row['hybrid']):>10}  "
              f"{_human(row['all_global']):>10}   {row['ratio']:.3f}{note}")
    return 0


def cmd_train(args) -> int:
    """`gemmalab train RECIPE`; a full or read-only output directory is one line that says what to do."""
    out_dir: list[str] = []
    try:
        return _train(args, out_dir)
    except OSError as e:
        import errno
        if not out_dir or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise
        print(f"gemmalab: error: {_train_write_error(e, Path(out_dir[0]))}", file=sys.stderr)
        return 1


def _train_write_error(e: OSError, out: Path) -> str:
    """A full disk (or quota, or file size limit) or a read-only file system under run.out_dir."""
    import errno

    from .train import checkpoint as ckpt

    name = errno.errorcode.get(e.errno, str(e.errno))
    where = e.filename or out
    try:
        latest = ckpt.latest(out)
    except OSError:
        latest = None
    kept = (f"the latest complete checkpoint, {latest}, is intact" if latest is not None
            else "no checkpoint was completed yet")
    if e.errno == errno.EROFS:
        return (f"cannot write {where}: {e.strerror} ({name}); {kept}: set run.out_dir to a writable "
                "directory (copy the run there to continue it with --resume)")
    return (f"cannot write {where}: {e.strerror} ({name}); {kept}: free space (or raise the quota) "
            "and rerun with --resume")


def _train(args, out_dir: list[str]) -> int:
    from .train.recipes import get_recipe, load_recipe_config, run_recipe

    cfg = load_recipe_config(args.recipe, args.config, args.overrides)
    out_dir.append(cfg.run.out_dir)
    last = run_recipe(args.recipe, cfg, resume=args.resume, progress=not args.no_progress)
    summary = get_recipe(args.recipe).summary
    if last and summary:
        print(summary(last, cfg))
    return 0


def cmd_distill(args) -> int:
    from .train.logit_store import LogitStore, build_store

    if args.tool == "inspect":
        store = LogitStore(args.store, verify=True)
        for i in range(len(store.shards)):
            store.shard(i)  # checks fingerprint, sha256 and shapes
        print(store.describe())
        print(f"all {len(store.shards)} shards verified (sha256)")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sampling = "topk" if args.sampling == "topk" else (
        "with_replacement" if args.replacement else "without_replacement")
    build_store(args.out, args.data, teacher=args.teacher, k=args.k, temperature=args.temperature,
                sampling=sampling, seq_len=args.seq_len, train_on=args.train_on, seed=args.seed,
                max_tokens=args.max_tokens, rows_per_shard=args.rows_per_shard,
                full_logprobs=args.full_logprobs, prob_dtype=args.prob_dtype,
                progress=not args.no_progress)
    return 0


def cmd_plot(args) -> int:
    from .train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def cmd_export(args) -> int:
    import time

    import torch

    from . import load
    from .checkpoints.export import GGUF_DTYPES, HF_DTYPES, save_gguf, save_hf
    from .train.recipes.qat import EXPORT_DTYPE, is_qat_run, load_qat_run

    t0 = time.perf_counter()
    embedding, encoder = args.embedding, args.sfp8_encoder
    if is_qat_run(args.src):
        model, tokenizer, cfg = load_qat_run(args.src)
        to, trained = EXPORT_DTYPE[cfg.qat.format]
        if args.dtype is None and args.to == to:
            args.dtype = trained
        elif (args.to, args.dtype) != (to, trained):
            shown = args.dtype or ("f16" if args.to == "gguf" else "fp32")
            print(f"note: {args.src} was trained on {cfg.qat.format}; exporting it as --to {args.to} "
                  f"--dtype {shown} rounds it on another grid (--to {to} --dtype {trained} keeps "
                  "what it learned)", file=sys.stderr)
        embedding = embedding or cfg.qat.embedding
        encoder = encoder or cfg.qat.sfp8_encoder
        if args.rounding != cfg.qat.rounding and cfg.qat.format != "sfp8":
            print(f"note: the run trained on {cfg.qat.rounding} rounding, the export uses {args.rounding}",
                  file=sys.stderr)
        multimodal = False
    else:
        model = tokenizer = None
    if args.to == "hf" and args.dtype is not None and args.dtype.lower() not in (*HF_DTYPES, "sfp8"):
        raise ValueError(f"--dtype {args.dtype} is not a Hugging Face dtype; use fp32, bf16 or sfp8")
    if args.to == "gguf" and args.dtype is not None and args.dtype not in GGUF_DTYPES:
        raise ValueError(f"--dtype {args.dtype} is not a GGUF dtype; use {', '.join(GGUF_DTYPES)}")
    if model is None:
        bf16 = (args.to == "hf" and args.dtype is not None and args.dtype.lower() != "sfp8"
                and HF_DTYPES[args.dtype.lower()] == torch.bfloat16)
        lm = load(args.src, mode="fp32", dtype=torch.bfloat16 if bf16 else torch.float32)
        model, tokenizer, multimodal = lm.model, lm.tokenizer, lm.multimodal is not None
    if multimodal:
        print(f"note: {args.src} is multimodal; only its text decoder is exported (export of the "
              "vision encoder is not implemented)", file=sys.stderr)
    if args.to == "hf" and (args.dtype or "").lower() == "sfp8":
        from .checkpoints.sfp8 import save_sfp8
        out = save_sfp8(model, tokenizer, args.out, exact_rne=encoder == "exact_rne",
                        overwrite=args.overwrite)
        size = sum(f.stat().st_size for f in out.iterdir())
    elif args.to == "hf":
        out = save_hf(model, tokenizer, args.out, dtype=args.dtype, overwrite=args.overwrite)
        size = sum(f.stat().st_size for f in out.iterdir())
    else:
        out = save_gguf(model, tokenizer, args.out, dtype=args.dtype or "f16", overwrite=args.overwrite,
                        embedding=embedding or "q8_0", rounding=args.rounding)
        size = out.stat().st_size
    print(f"wrote {out} ({_human(size)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .checkpoints.errors import CheckpointError
    from .quant.kernels import KernelsUnavailable

    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"generate": cmd_generate, "chat": cmd_chat, "info": cmd_info, "train": cmd_train,
               "plot": cmd_plot, "export": cmd_export, "serve": cmd_serve,
               "distill": cmd_distill, "eval": lambda a: a.func(a),
               "sandbox": lambda a: a.func(a), "merge": lambda a: a.func(a),
               "reward": lambda a: a.func(a)}[args.command]
    try:
        return handler(args)
    except (CheckpointError, ValueError, OSError, KernelsUnavailable, ImportError) as e:
        print(f"gemmalab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `gemmalab generate ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
